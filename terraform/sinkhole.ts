/**
 * The sinkhole tier as one terraform-cdk construct, synthesized into a plain Terraform
 * module (terraform/module/main.tf.json) that HCL users consume without cdktf.
 *
 * No prebuilt provider bindings: resources are declared by their Terraform type with
 * snake_case attributes (`Resource` below), so the module needs only `hashicorp/aws`.
 */
import {
  TerraformDataSource,
  TerraformOutput,
  TerraformResource,
  TerraformStack,
  TerraformVariable,
  Testing,
} from "cdktf";
import type { TerraformResourceLifecycle } from "cdktf";
import { Construct } from "constructs";

/** The AWS provider, pinned (terraform/live/.terraform.lock.hcl holds its checksum). */
export const AWS_PROVIDER_VERSION = "5.100.0";
export const REPOSITORY_NAME = "cabal-sinkhole";
export const SERVICE_NAME = "cabal-sinkhole";
export const CLOUD_MAP_NAME = "sinkhole";
export const CONTAINER_NAME = "sinkhole";
export const MEMORY_RESERVATION_MB = 64;
export const MEMORY_HARD_CAP_MB = 128;
export const SMTP_PORT = 25;
export const DNS_TTL_S = 10;
/** awslogs in non-blocking mode buffers this much when CloudWatch is slow, then drops (never blocks the listener). */
export const AWSLOGS_BUFFER = "4m";
/** The image tag parameter's value until the image workflow has pushed one (Cabalmail's sentinel). */
export const PLACEHOLDER_IMAGE_TAG = "bootstrap-placeholder";
/** Where the image workflow records the deployed tag (Cabalmail's `/cabal/deployed_image_tag/<tier>`). */
export const IMAGE_TAG_PARAMETER = "/cabal/deployed_image_tag/sinkhole";
/**
 * The forgotten-mail filter: sinkhole.test in the MTA's log, but not the probes the buttons
 * send on purpose (sender sinkhole-probe@sinkhole.test, recipients probe-RUN-N@sinkhole.test).
 */
export const FORGOTTEN_MAIL_PATTERN = '"sinkhole.test" -"sinkhole-probe" -"probe-"';
/** Tag keys that say which environment a resource belongs to (Cabalmail's default_tags set `environment`). */
export const ENVIRONMENT_TAG_KEYS = ["environment", "env"];
export const GUARD_MESSAGE =
  "sinkhole is never deployed to production: not when the environment's name says prod (prod, production, PROD, " +
  "prod-eu, any case or punctuation), and not when the target cluster is tagged as production (its environment " +
  "tag, which Cabalmail's default_tags put on every resource of the account). Nothing can allow it: the tier " +
  "answers mail with operator-chosen failures and would defer, bounce or swallow real mail.";

/**
 * Cabalmail's own sinkhole tier, by the names only it uses (cabal-infra
 * terraform/infra/modules/ecs/sinkhole.tf:29 and :89): when either exists, this module must not
 * make a tier beside it; the image goes into that one (ctl deploy, docs/deploy.md).
 */
export const CABALMAIL_TIER_SECURITY_GROUP = "cabal-ecs-sinkhole-sg";
export const CABALMAIL_TIER_TASK_ROLE = "cabal-ecs-sinkhole-task-role";
/** Cabalmail's execution role: the only task role its cabal-sinkhole repository policy lets pull (cabal-infra terraform/infra/main.tf:315-328, modules/ecr/main.tf:104-133). */
export const CABALMAIL_EXECUTION_ROLE = "cabal-ecs-execution-role";
/** The tag this module puts on what it creates, so a plan can tell its own resources from another state's of the same name. */
export const OWNER_TAG = { key: "sinkhole-module", value: "owned" } as const;
const OWNED = { [OWNER_TAG.key]: OWNER_TAG.value };
export const CABALMAIL_TIER_MESSAGE =
  `Cabalmail's own sinkhole tier is in this account (${CABALMAIL_TIER_TASK_ROLE} or ${CABALMAIL_TIER_SECURITY_GROUP}: ` +
  "cabal-infra's modules/ecs/sinkhole.tf, var.sinkhole). This module would make a second tier under the same " +
  "names. Leave SINKHOLE unset here and deliver the image into Cabalmail's tier: the image workflow pushes it " +
  'and runs `deno task ctl deploy` (docs/deploy.md, "Cabalmail\'s tier exists").';

/** The HCL test for "this name says production": lower case, letters only, starting with prod. */
export const prodName = (expr: string) => `startswith(replace(lower(${expr}), "/[^a-z]/", ""), "prod")`;

/** A resource or data source gated on an HCL boolean expression: count = cond ? 1 : 0. */
function gated<T extends TerraformResource | TerraformDataSource>(element: T, condition: string): T {
  element.addOverride("count", `\${${condition} ? 1 : 0}`);
  return element;
}

/** The HCL expression for an attribute at `address`; of a gated element, its one instance's (null while off). */
const attributeOf = (address: string, attribute: string, isGated: boolean) =>
  isGated ? `one(${address}[*].${attribute})` : `${address}.${attribute}`;

/** A Terraform resource by type, with its attributes as Terraform spells them. */
export class Resource extends TerraformResource {
  constructor(
    scope: Construct,
    id: string,
    type: string,
    private readonly attributes: Record<string, unknown>,
    lifecycle?: TerraformResourceLifecycle,
  ) {
    super(scope, id, { terraformResourceType: type, lifecycle });
  }

  protected override synthesizeAttributes(): Record<string, unknown> {
    return this.attributes;
  }

  /** Gates the resource on an HCL boolean expression (count = cond ? 1 : 0). */
  gate(condition: string): this {
    return gated(this, condition);
  }

  /** The HCL expression for an attribute of the (possibly gated) resource. */
  expr(attribute: string, isGated = false): string {
    return attributeOf(`${this.terraformResourceType}.${this.friendlyUniqueId}`, attribute, isGated);
  }

  /** The same, as an interpolation. */
  ref(attribute: string, gated = false): string {
    return `\${${this.expr(attribute, gated)}}`;
  }
}

/** A Terraform data source by type, with its arguments as Terraform spells them. */
export class Data extends TerraformDataSource {
  constructor(scope: Construct, id: string, type: string, private readonly attributes: Record<string, unknown>) {
    super(scope, id, { terraformResourceType: type });
  }

  protected override synthesizeAttributes(): Record<string, unknown> {
    return this.attributes;
  }

  gate(condition: string): this {
    return gated(this, condition);
  }

  expr(attribute: string, isGated = false): string {
    return attributeOf(`data.${this.terraformResourceType}.${this.friendlyUniqueId}`, attribute, isGated);
  }

  /** A list attribute of a gated data source, flattened (empty while the gate is off). */
  all(attribute: string): string {
    return `flatten(data.${this.terraformResourceType}.${this.friendlyUniqueId}[*].${attribute})`;
  }
}

const v = (name: string) => `var.${name}`;

/** The guard, in HCL: neither the environment's name nor the cluster's environment tag says production. */
export const GUARD_CONDITION = `!${prodName("var.environment")} && alltrue([for k, v in var.cluster_tags : ` +
  `!${prodName("v")} if contains(${JSON.stringify(ENVIRONMENT_TAG_KEYS)}, lower(k))])`;

export class SinkholeStack extends TerraformStack {
  constructor(scope: Construct, id: string) {
    super(scope, id);
    const variable = (name: string, config: ConstructorParameters<typeof TerraformVariable>[2]) =>
      new TerraformVariable(this, name, config);
    const name = (variableName: string, fallback: string, what: string) =>
      variable(variableName, {
        type: "string",
        default: fallback,
        description: `${what}; set to an existing one's name to adopt it (docs/deploy.md).`,
      });

    variable("environment", {
      type: "string",
      description:
        "Environment name (development, stage). A name that says production is refused, whatever else is set.",
      validation: [{ condition: `\${!${prodName("var.environment")}}`, errorMessage: GUARD_MESSAGE }],
    });
    variable("cluster_tags", {
      type: "map(string)",
      description: "Tags of the target ECS cluster (the root reads them): a cluster tagged as production is refused.",
      validation: [{
        condition: `\${${GUARD_CONDITION.replace(`!${prodName("var.environment")} && `, "")}}`,
        errorMessage: GUARD_MESSAGE,
      }],
    });
    variable("sinkhole", {
      type: "bool",
      default: false,
      description: "Make the sinkhole tier here: only where Cabalmail's own tier is not (the plan stops otherwise). " +
        "The ECR repository and the image tag parameter are Cabalmail's, looked up, never created.",
    });
    variable("quiesced", {
      type: "bool",
      default: false,
      description: "Scale the tier to zero: the Cloud Map name stays, with no address (the runbook's offline test).",
    });
    variable("region", { type: "string", description: "AWS region of the cluster." });
    variable("cluster_arn", { type: "string", description: "ARN of the existing ECS cluster." });
    variable("cluster_name", { type: "string", description: "Name of that cluster (for the drain commands)." });
    variable("capacity_provider", { type: "string", description: "EC2 capacity provider of the cluster." });
    variable("vpc_id", { type: "string", description: "VPC of the cluster, for the task's security group." });
    variable("subnet_ids", { type: "list(string)", description: "Private subnets for the task ENI." });
    variable("vpc_cidr", { type: "string", description: "Only this CIDR may reach port 25." });
    variable("namespace_id", { type: "string", description: "Cloud Map private DNS namespace id (cabal.internal)." });
    variable("namespace_name", {
      type: "string",
      default: "cabal.internal",
      description: "DNS name of that namespace: the sinkhole answers as sinkhole.<namespace_name>.",
    });
    variable("mode_parameter_name", {
      type: "string",
      default: "/cabal/sinkhole_mode",
      description: "SSM parameter holding the mode (the listener's SINKHOLE_MODE_PARAM).",
    });
    variable("image_tag_parameter_name", {
      type: "string",
      default: IMAGE_TAG_PARAMETER,
      description: "SSM parameter the image workflow writes the pushed tag to; the task definition runs that tag.",
    });
    variable("cache_ttl_seconds", {
      type: "number",
      default: 30,
      description: "Seconds between the listener's mode fetches (SINKHOLE_CACHE_TTL).",
    });
    variable("log_retention_days", {
      type: "number",
      default: 14,
      description: "Days the sinkhole's log group keeps its session and message lines.",
    });
    variable("mta_log_group_name", {
      type: "string",
      default: "",
      description: "The sending MTA's log group, watched for forgotten sinkhole.test mail; empty: no alarm.",
    });
    variable("alarm_actions", {
      type: "list(string)",
      default: [],
      description: "ARNs notified when the forgotten-mail alarm fires (SNS topics); empty: the alarm only shows.",
    });
    name("service_name", SERVICE_NAME, "ECS service and task family");
    name("log_group_name", `/ecs/${SERVICE_NAME}`, "The sinkhole's log group");
    name("security_group_name", SERVICE_NAME, "The task's security group");
    name("task_role_name", `${SERVICE_NAME}-task`, "The task role (reads the mode parameter)");
    variable("execution_role_name", {
      type: "string",
      default: CABALMAIL_EXECUTION_ROLE,
      description: "The existing execution role the task pulls and logs under: Cabalmail's, the one its " +
        "cabal-sinkhole repository policy lets pull (a role of this module's own would be denied).",
    });

    // --- Always: the guard, and what Cabalmail's Terraform always makes, looked up ---------
    // One more layer for a root that skips the variables' validation (e.g. passes no tags):
    // every plan fails here, before anything is created, in production.
    new Resource(this, "production_guard", "terraform_data", { input: `\${${v("environment")}}` }, {
      precondition: [{ condition: `\${${GUARD_CONDITION}}`, errorMessage: GUARD_MESSAGE }],
    });
    // cabal-infra creates both in every account, whatever its var.sinkhole says
    // (terraform/infra/modules/ecr/main.tf:51-67; terraform/infra/main.tf:62-72): never a second.
    const repo = new Data(this, "repository", "aws_ecr_repository", { name: REPOSITORY_NAME });
    const imageTag = new Data(this, "image_tag", "aws_ssm_parameter", { name: `\${${v("image_tag_parameter_name")}}` });

    // --- Gated on var.sinkhole ------------------------------------------------------------
    const on = v("sinkhole");
    const tag = `nonsensitive(${imageTag.expr("value")})`;
    const hasImage = `${tag} != "${PLACEHOLDER_IMAGE_TAG}"`;

    // What would collide, read before anything is made: Cabalmail's tier by the names only it
    // uses, and the same-named log group and mode parameter when they are not this module's
    // (its own carry OWNER_TAG; a parameter is taken as this module's when its log group is).
    const cabalRoles = new Data(this, "cabalmail_tier_role", "aws_iam_roles", {
      name_regex: `^${CABALMAIL_TIER_TASK_ROLE}$`,
    }).gate(on);
    const cabalGroups = new Data(this, "cabalmail_tier_security_group", "aws_security_groups", {
      filter: [
        { name: "group-name", values: [CABALMAIL_TIER_SECURITY_GROUP] },
        { name: "vpc-id", values: [`\${${v("vpc_id")}}`] },
      ],
    }).gate(on);
    const groups = new Data(this, "existing_log_groups", "aws_cloudwatch_log_groups", {
      log_group_name_prefix: `\${${v("log_group_name")}}`,
    }).gate(on);
    const existingGroup = new Data(this, "existing_log_group", "aws_cloudwatch_log_group", {
      name: "${each.key}",
    });
    existingGroup.addOverride(
      "for_each",
      `\${toset([for n in ${groups.all("log_group_names")} : n if n == ${v("log_group_name")}])}`,
    );
    const ownGroup = `alltrue([for g in values(data.aws_cloudwatch_log_group.${existingGroup.friendlyUniqueId}) : ` +
      `lookup(g.tags, "${OWNER_TAG.key}", "") == "${OWNER_TAG.value}"])`;
    const noGroup = `length(data.aws_cloudwatch_log_group.${existingGroup.friendlyUniqueId}) == 0`;
    const parameters = new Data(this, "existing_parameters", "aws_ssm_parameters_by_path", {
      path: `\${replace(${v("mode_parameter_name")}, "/[/][^/]*$/", "")}`,
    }).gate(on);
    const paramExists = `contains(${parameters.all("names")}, ${v("mode_parameter_name")})`;
    new Resource(this, "collision_guard", "terraform_data", { input: `\${${v("service_name")}}` }, {
      precondition: [
        {
          condition: `\${length(${cabalRoles.all("names")}) == 0 && ` +
            `length(${cabalGroups.all("ids")}) == 0}`,
          errorMessage: CABALMAIL_TIER_MESSAGE,
        },
        {
          condition: `\${${ownGroup}}`,
          errorMessage: `The log group \${${v("log_group_name")}} exists and is not this module's (no ` +
            `${OWNER_TAG.key} tag): another state owns it. ${CABALMAIL_TIER_MESSAGE}`,
        },
        {
          condition: `\${!${paramExists} || (!(${noGroup}) && ${ownGroup})}`,
          errorMessage: `The parameter \${${v("mode_parameter_name")}} exists and this module's tier does ` +
            `not: another state owns it. ${CABALMAIL_TIER_MESSAGE}`,
        },
      ],
    }).gate(on);
    /** Made only after the collision guard's preconditions held. */
    const guarded = (...rs: Resource[]) =>
      rs.forEach((r) => r.addOverride("depends_on", ["terraform_data.collision_guard"]));

    const mode = new Resource(this, "mode", "aws_ssm_parameter", {
      name: `\${${v("mode_parameter_name")}}`,
      type: "String",
      value: "defer",
      description: "sinkhole mode: defer, bounce, accept, accept-log, greylist, or a scenario (docs/modes.md)",
      tags: OWNED,
    }, { ignoreChanges: ["value"] }).gate(on);
    const logs = new Resource(this, "logs", "aws_cloudwatch_log_group", {
      name: `\${${v("log_group_name")}}`,
      retention_in_days: `\${${v("log_retention_days")}}`,
      tags: OWNED,
    }).gate(on);

    const assumeEcsTasks = JSON.stringify({
      Version: "2012-10-17",
      Statement: [{ Effect: "Allow", Principal: { Service: "ecs-tasks.amazonaws.com" }, Action: "sts:AssumeRole" }],
    });
    const taskRole = new Resource(this, "task_role", "aws_iam_role", {
      name: `\${${v("task_role_name")}}`,
      assume_role_policy: assumeEcsTasks,
      tags: OWNED,
    }).gate(on);
    new Resource(this, "task_policy", "aws_iam_role_policy", {
      name: "read-mode-parameter",
      role: taskRole.ref("id", true),
      policy: `\${jsonencode({Version = "2012-10-17", Statement = [{Effect = "Allow", Action = "ssm:GetParameter", ` +
        `Resource = ${mode.expr("arn", true)}}]})}`,
    }).gate(on);
    const executionRole = new Data(this, "execution_role", "aws_iam_role", { name: `\${${v("execution_role_name")}}` })
      .gate(on);

    new Resource(this, "image_tag_seen", "terraform_data", { input: `\${${tag}}` }).gate(on);
    const task = new Resource(this, "task", "aws_ecs_task_definition", {
      family: `\${${v("service_name")}}`,
      network_mode: "awsvpc",
      requires_compatibilities: ["EC2"],
      task_role_arn: taskRole.ref("arn", true),
      execution_role_arn: `\${${executionRole.expr("arn", true)}}`,
      tags: OWNED,
      container_definitions: `\${jsonencode([{
  name = "${CONTAINER_NAME}"
  image = "\${${repo.expr("repository_url")}}:\${${tag}}"
  essential = true
  memory = ${MEMORY_HARD_CAP_MB}
  memoryReservation = ${MEMORY_RESERVATION_MB}
  readonlyRootFilesystem = true
  portMappings = [{ containerPort = ${SMTP_PORT}, protocol = "tcp" }]
  systemControls = [{ namespace = "net.ipv4.ip_unprivileged_port_start", value = "${SMTP_PORT}" }]
  environment = [
    { name = "SINKHOLE_MODE_PARAM", value = ${v("mode_parameter_name")} },
    { name = "SINKHOLE_SERVER_NAME", value = "${CLOUD_MAP_NAME}.\${${v("namespace_name")}}" },
    { name = "SINKHOLE_CACHE_TTL", value = tostring(${v("cache_ttl_seconds")}) },
    { name = "AWS_REGION", value = ${v("region")} },
  ]
  healthCheck = { command = ["CMD", "/sinkhole", "--healthcheck"], interval = 30, timeout = 5, retries = 3, startPeriod = 10 }
  logConfiguration = {
    logDriver = "awslogs"
    options = {
      "awslogs-group" = ${logs.expr("name", true)}
      "awslogs-region" = ${v("region")}
      "awslogs-stream-prefix" = "${CONTAINER_NAME}"
      "mode" = "non-blocking"
      "max-buffer-size" = "${AWSLOGS_BUFFER}"
    }
  }
}])}`,
    }, {
      // ctl deploy rolls new revisions, as Cabalmail's deploy does (its sinkhole.tf:267-268):
      // Terraform never rolls one back. Its own revision follows the tag ctl deploy stored (a
      // new tag replaces it, with that image), so a service Terraform (re)creates runs the
      // deployed image too; the running service's task definition is ignored either way.
      ignoreChanges: ["container_definitions"],
      replaceTriggeredBy: ["terraform_data.image_tag_seen"],
      precondition: [{ condition: `\${${GUARD_CONDITION}}`, errorMessage: GUARD_MESSAGE }],
    }).gate(on);

    const sg = new Resource(this, "security_group", "aws_security_group", {
      name: `\${${v("security_group_name")}}`,
      description: "sinkhole: SMTP from the VPC only",
      tags: OWNED,
      vpc_id: `\${${v("vpc_id")}}`,
      ingress: [{
        description: "SMTP from the VPC",
        from_port: SMTP_PORT,
        to_port: SMTP_PORT,
        protocol: "tcp",
        cidr_blocks: [`\${${v("vpc_cidr")}}`],
        ipv6_cidr_blocks: [],
        prefix_list_ids: [],
        security_groups: [],
        self: false,
      }],
      egress: [{
        description: "HTTPS to the SSM and ECR APIs",
        from_port: 443,
        to_port: 443,
        protocol: "tcp",
        cidr_blocks: ["0.0.0.0/0"],
        ipv6_cidr_blocks: [],
        prefix_list_ids: [],
        security_groups: [],
        self: false,
      }],
    }).gate(on);

    const discovery = new Resource(this, "discovery", "aws_service_discovery_service", {
      name: CLOUD_MAP_NAME,
      tags: OWNED,
      dns_config: {
        namespace_id: `\${${v("namespace_id")}}`,
        routing_policy: "MULTIVALUE",
        dns_records: [{ ttl: DNS_TTL_S, type: "A" }],
      },
      // No health_check_custom_config (its failure_threshold is deprecated, and it forces a
      // replacement): as Cabalmail's own registration, so adopting one needs no replacement.
    }).gate(on);

    guarded(mode, logs, taskRole, sg, discovery);

    // One deploy path in every account: ctl deploy rolls the running service to a new revision
    // (as Cabalmail's app workflow does), so the service's task definition and the container
    // definitions are Terraform's only at creation. No task is asked for until an image was
    // pushed: a service that cannot pull stays at 0 and stable, so it never holds Cabalmail's
    // pipeline, which waits for every cabal-* service (its refresh-ssm-from-running.sh).
    const desired = `${v("quiesced")} || !(${hasImage}) ? 0 : 1`;
    const service = new Resource(this, "service", "aws_ecs_service", {
      name: `\${${v("service_name")}}`,
      cluster: `\${${v("cluster_arn")}}`,
      task_definition: task.ref("arn", true),
      desired_count: `\${${desired}}`,
      deployment_minimum_healthy_percent: 0,
      deployment_maximum_percent: 100,
      capacity_provider_strategy: [{ capacity_provider: `\${${v("capacity_provider")}}`, weight: 100 }],
      network_configuration: {
        subnets: `\${${v("subnet_ids")}}`,
        security_groups: [sg.ref("id", true)],
        assign_public_ip: false,
      },
      service_registries: { registry_arn: discovery.ref("arn", true) },
      tags: OWNED,
    }, { ignoreChanges: ["task_definition"] }).gate(on);

    // Drain before deregister (the pattern of Cabalmail's service_discovery.tf): keyed on the
    // Cloud Map service and the quiesce flag, so replacing the Cloud Map service or quiescing
    // runs it. On destroy (the old Cloud Map service goes), scale to zero and wait, so no
    // instance is left registered; on create, restore the desired count and force a new
    // deployment, so the task registers against the current Cloud Map service.
    const reconcile = new Resource(this, "cloud_map_lifecycle", "terraform_data", {
      triggers_replace: [discovery.ref("id", true), `\${${v("quiesced")}}`],
      input: {
        cluster: `\${${v("cluster_name")}}`,
        service: `\${${v("service_name")}}`,
        region: `\${${v("region")}}`,
        desired_count: `\${${desired}}`,
      },
    }).gate(on);
    reconcile.addOverride("provisioner", [
      {
        "local-exec": {
          when: "destroy",
          command: "AWS_PAGER= aws ecs update-service --region ${self.input.region} --cluster ${self.input.cluster} " +
            "--service ${self.input.service} --desired-count 0 > /dev/null && " +
            "aws ecs wait services-stable --region ${self.input.region} --cluster ${self.input.cluster} " +
            "--services ${self.input.service}",
        },
      },
      {
        "local-exec": {
          command: "AWS_PAGER= aws ecs update-service --region ${self.input.region} --cluster ${self.input.cluster} " +
            "--service ${self.input.service} --desired-count ${self.input.desired_count} " +
            "--force-new-deployment > /dev/null",
        },
      },
    ]);
    reconcile.addOverride("depends_on", [`aws_ecs_service.${service.friendlyUniqueId}`]);

    // --- Forgotten test mail: alarm on the sending MTA's queue logs -----------------------
    const watching = `${v("mta_log_group_name")} != ""`;
    new Resource(this, "forgotten_mail_filter", "aws_cloudwatch_log_metric_filter", {
      name: "sinkhole-test-mail-in-mta-logs",
      log_group_name: `\${${v("mta_log_group_name")}}`,
      pattern: FORGOTTEN_MAIL_PATTERN,
      metric_transformation: {
        name: "SinkholeTestMailLogged",
        namespace: "Cabal/Sinkhole",
        value: "1",
        default_value: "0",
      },
    }).gate(watching);
    new Resource(this, "forgotten_mail_alarm", "aws_cloudwatch_metric_alarm", {
      alarm_name: "sinkhole-test-mail-forgotten",
      alarm_description: "sinkhole.test mail (not a probe) appears in the sending MTA's logs: a test message is " +
        "queued or retried. Put the sinkhole mode back and purge the queue (docs/runbook.md).",
      namespace: "Cabal/Sinkhole",
      metric_name: "SinkholeTestMailLogged",
      statistic: "Sum",
      period: 3600,
      evaluation_periods: 1,
      threshold: 1,
      comparison_operator: "GreaterThanOrEqualToThreshold",
      treat_missing_data: "notBreaching",
      alarm_actions: `\${${v("alarm_actions")}}`,
    }).gate(watching);

    // --- Outputs ------------------------------------------------------------------------
    const hostname = `${CLOUD_MAP_NAME}.\${${v("namespace_name")}}`;
    new TerraformOutput(this, "repository_url", {
      value: `\${${repo.expr("repository_url")}}`,
      description: "ECR repository the image workflow pushes to.",
    });
    new TerraformOutput(this, "hostname", {
      value: hostname,
      description: "The name smtp-out routes sinkhole.test to (Cloud Map).",
    });
    new TerraformOutput(this, "parameter_name", {
      value: `\${${v("mode_parameter_name")}}`,
      description: "SSM parameter holding the mode: what ctl mode set writes.",
    });
    new TerraformOutput(this, "parameter_arn", {
      value: `\${${on} ? ${mode.expr("arn", true)} : ""}`,
      description: "ARN of that parameter when this module made it (empty otherwise), for IAM policies.",
    });
    new TerraformOutput(this, "image_tag_parameter", {
      value: `\${${v("image_tag_parameter_name")}}`,
      description: "SSM parameter the image workflow writes the pushed tag to.",
    });
    new TerraformOutput(this, "image", {
      value: `\${${on} && ${hasImage} ? "\${${repo.expr("repository_url")}}:\${${tag}}" : ""}`,
      description: "The image the task definition runs; empty while the tier is off or no image was pushed.",
    });
    new TerraformOutput(this, "ecs_service", {
      value: `\${${v("service_name")}}`,
      description: "The ECS service (ctl's sinkholeService).",
    });
    new TerraformOutput(this, "sinkhole_log_group", {
      value: `\${${v("log_group_name")}}`,
      description: "The sinkhole's log group (ctl's sinkholeLogGroup).",
    });
    new TerraformOutput(this, "smtp_out_environment", {
      value: `\${${on} ? [{ name = "SINKHOLE_ENABLED", value = "true" }] : []}`,
      description: "Add to the sending MTA's task definition environment.",
    });
    new TerraformOutput(this, "mailertable_line", {
      value: `sinkhole.test smtp:[${hostname}]`,
      description: "The mailertable line integration/sinkhole-mailertable.sh adds to smtp-out.",
    });
  }
}

/** Synthesizes the stack and returns the plain module: no backend, no cdktf metadata. */
export function synthModule(): Record<string, unknown> {
  const app = Testing.app();
  const stack = new SinkholeStack(app, "sinkhole");
  const json = JSON.parse(Testing.synth(stack)) as Record<string, unknown>;
  return clean({
    terraform: {
      required_version: ">= 1.10",
      required_providers: { aws: { source: "hashicorp/aws", version: AWS_PROVIDER_VERSION } },
    },
    ...json,
  }) as Record<string, unknown>;
}

/** Drops cdktf's "//" metadata keys anywhere in the tree. */
function clean(node: unknown): unknown {
  if (Array.isArray(node)) return node.map(clean);
  if (node && typeof node === "object") {
    return Object.fromEntries(
      Object.entries(node as Record<string, unknown>).filter(([k]) => k !== "//").map(([k, val]) => [k, clean(val)]),
    );
  }
  return node;
}

export const MODULE_PATH = new URL("./module/main.tf.json", import.meta.url).pathname;

export function moduleText(): string {
  return JSON.stringify(synthModule(), null, 2) + "\n";
}
