/**
 * The sinkhole tier as one terraform-cdk construct, synthesized into a plain Terraform
 * module (terraform/module/main.tf.json) that HCL users consume without cdktf.
 *
 * No prebuilt provider bindings: resources are declared by their Terraform type with
 * snake_case attributes (`Resource` below), so the module needs only `hashicorp/aws`.
 */
import { TerraformOutput, TerraformResource, TerraformStack, TerraformVariable, Testing } from "cdktf";
import type { TerraformResourceLifecycle } from "cdktf";
import { Construct } from "constructs";

export const REPOSITORY_NAME = "cabal-sinkhole";
export const SERVICE_NAME = "cabal-sinkhole";
export const CLOUD_MAP_NAME = "sinkhole";
export const CONTAINER_NAME = "sinkhole";
export const MEMORY_RESERVATION_MB = 64;
export const MEMORY_HARD_CAP_MB = 128;
export const SMTP_PORT = 25;
export const DNS_TTL_S = 10;
/** Environments that may never run the tier, whatever the allow-list says. */
export const FORBIDDEN_ENVIRONMENTS = ["prod", "production"];
export const GUARD_MESSAGE =
  "The sinkhole tier must never run in production: sinkhole = true is allowed only when var.environment is in " +
  "var.allowed_environments (default development, stage) and is never prod or production. It answers mail with " +
  "operator-chosen failures and would defer, bounce or swallow real mail.";

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
    this.addOverride("count", `\${${condition} ? 1 : 0}`);
    return this;
  }

  /** The HCL expression for an attribute of the (possibly gated) resource. */
  expr(attribute: string, gated = false): string {
    const address = `${this.terraformResourceType}.${this.friendlyUniqueId}`;
    return gated ? `one(${address}[*].${attribute})` : `${address}.${attribute}`;
  }

  /** The same, as an interpolation. */
  ref(attribute: string, gated = false): string {
    return `\${${this.expr(attribute, gated)}}`;
  }
}

const v = (name: string) => `var.${name}`;

/** The guard, in HCL: on is allowed only in listed environments and never in production. */
export const GUARD_CONDITION = `!var.sinkhole || (contains([for e in var.allowed_environments : lower(e)], ` +
  `lower(var.environment)) && !contains(${JSON.stringify(FORBIDDEN_ENVIRONMENTS)}, lower(var.environment)))`;

export class SinkholeStack extends TerraformStack {
  constructor(scope: Construct, id: string) {
    super(scope, id);
    const variable = (name: string, config: ConstructorParameters<typeof TerraformVariable>[2]) =>
      new TerraformVariable(this, name, config);

    variable("environment", { type: "string", description: "Environment name (development, stage, prod, …)." });
    variable("allowed_environments", {
      type: "list(string)",
      default: ["development", "stage"],
      description: "Environments where sinkhole = true is allowed (prod and production never are).",
    });
    variable("sinkhole", {
      type: "bool",
      default: false,
      description: "Run the sinkhole tier. The ECR repository and the SSM parameter exist either way.",
      validation: [{ condition: `\${${GUARD_CONDITION}}`, errorMessage: GUARD_MESSAGE }],
    });
    variable("quiesced", {
      type: "bool",
      default: false,
      description: "Scale the tier to zero: the Cloud Map name stays, with no address (the runbook's offline test).",
    });
    variable("region", { type: "string", description: "AWS region of the cluster." });
    variable("cluster_arn", { type: "string", description: "ARN of the existing ECS cluster." });
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
    variable("image", {
      type: "string",
      default: "",
      description:
        "Image URI for the first task definition; empty: <repository>:initial. Later deploys are out of band.",
    });
    variable("mode_parameter_name", {
      type: "string",
      default: "/cabal/sinkhole_mode",
      description: "SSM parameter holding the mode (the listener's SINKHOLE_MODE_PARAM).",
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

    // --- Always: the repository and the mode parameter ------------------------------------
    const repo = new Resource(this, "repository", "aws_ecr_repository", {
      name: REPOSITORY_NAME,
      image_tag_mutability: "IMMUTABLE",
      image_scanning_configuration: { scan_on_push: true },
    }, { preventDestroy: true });
    new Resource(this, "repository_expiry", "aws_ecr_lifecycle_policy", {
      repository: repo.ref("name"),
      policy: JSON.stringify({
        rules: [
          {
            rulePriority: 1,
            description: "Expire untagged images after 7 days",
            selection: { tagStatus: "untagged", countType: "sinceImagePushed", countUnit: "days", countNumber: 7 },
            action: { type: "expire" },
          },
          {
            rulePriority: 2,
            description: "Keep the 20 most recent images",
            selection: { tagStatus: "any", countType: "imageCountMoreThan", countNumber: 20 },
            action: { type: "expire" },
          },
        ],
      }),
    });
    const mode = new Resource(this, "mode", "aws_ssm_parameter", {
      name: `\${${v("mode_parameter_name")}}`,
      type: "String",
      value: "defer",
      description: "sinkhole mode: defer, bounce, accept, accept-log, greylist",
    }, { ignoreChanges: ["value"] });

    // --- Gated on var.sinkhole ------------------------------------------------------------
    const on = v("sinkhole");
    const logs = new Resource(this, "logs", "aws_cloudwatch_log_group", {
      name: `/ecs/${SERVICE_NAME}`,
      retention_in_days: `\${${v("log_retention_days")}}`,
    }).gate(on);

    const assumeEcsTasks = JSON.stringify({
      Version: "2012-10-17",
      Statement: [{ Effect: "Allow", Principal: { Service: "ecs-tasks.amazonaws.com" }, Action: "sts:AssumeRole" }],
    });
    const taskRole = new Resource(this, "task_role", "aws_iam_role", {
      name: `${SERVICE_NAME}-task`,
      assume_role_policy: assumeEcsTasks,
    }).gate(on);
    new Resource(this, "task_policy", "aws_iam_role_policy", {
      name: "read-mode-parameter",
      role: taskRole.ref("id", true),
      policy: `\${jsonencode({Version = "2012-10-17", Statement = [{Effect = "Allow", Action = "ssm:GetParameter", ` +
        `Resource = ${mode.expr("arn")}}]})}`,
    }).gate(on);

    const executionRole = new Resource(this, "execution_role", "aws_iam_role", {
      name: `${SERVICE_NAME}-execution`,
      assume_role_policy: assumeEcsTasks,
    }).gate(on);
    new Resource(this, "execution_policy", "aws_iam_role_policy", {
      name: "pull-image-write-logs",
      role: executionRole.ref("id", true),
      policy: `\${jsonencode({Version = "2012-10-17", Statement = [` +
        `{Effect = "Allow", Action = "ecr:GetAuthorizationToken", Resource = "*"}, ` +
        `{Effect = "Allow", Action = ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"], ` +
        `Resource = ${repo.expr("arn")}}, ` +
        `{Effect = "Allow", Action = ["logs:CreateLogStream", "logs:PutLogEvents"], ` +
        `Resource = "\${${logs.expr("arn", true)}}:*"}]})}`,
    }).gate(on);

    const image = `${v("image")} != "" ? ${v("image")} : "\${${repo.expr("repository_url")}}:initial"`;
    const task = new Resource(this, "task", "aws_ecs_task_definition", {
      family: SERVICE_NAME,
      network_mode: "awsvpc",
      requires_compatibilities: ["EC2"],
      task_role_arn: taskRole.ref("arn", true),
      execution_role_arn: executionRole.ref("arn", true),
      container_definitions: `\${jsonencode([{
  name = "${CONTAINER_NAME}"
  image = ${image}
  essential = true
  memory = ${MEMORY_HARD_CAP_MB}
  memoryReservation = ${MEMORY_RESERVATION_MB}
  readonlyRootFilesystem = true
  portMappings = [{ containerPort = ${SMTP_PORT}, protocol = "tcp" }]
  systemControls = [{ namespace = "net.ipv4.ip_unprivileged_port_start", value = "${SMTP_PORT}" }]
  environment = [
    { name = "SINKHOLE_MODE_PARAM", value = ${mode.expr("name")} },
    { name = "SINKHOLE_SERVER_NAME", value = "${CLOUD_MAP_NAME}.\${${v("namespace_name")}}" },
    { name = "AWS_REGION", value = ${v("region")} },
  ]
  healthCheck = { command = ["CMD", "/sinkhole", "--healthcheck"], interval = 30, timeout = 5, retries = 3, startPeriod = 10 }
  logConfiguration = {
    logDriver = "awslogs"
    options = {
      "awslogs-group" = ${logs.expr("name", true)}
      "awslogs-region" = ${v("region")}
      "awslogs-stream-prefix" = "${CONTAINER_NAME}"
    }
  }
}])}`,
    }, {
      ignoreChanges: ["container_definitions"],
      precondition: [{ condition: `\${${GUARD_CONDITION}}`, errorMessage: GUARD_MESSAGE }],
    }).gate(on);

    const sg = new Resource(this, "security_group", "aws_security_group", {
      name: SERVICE_NAME,
      description: "sinkhole: SMTP from the VPC only",
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
        description: "HTTPS to the SSM API",
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
      dns_config: {
        namespace_id: `\${${v("namespace_id")}}`,
        routing_policy: "MULTIVALUE",
        dns_records: [{ ttl: DNS_TTL_S, type: "A" }],
      },
      health_check_custom_config: { failure_threshold: 1 },
    }).gate(on);

    const service = new Resource(this, "service", "aws_ecs_service", {
      name: SERVICE_NAME,
      cluster: `\${${v("cluster_arn")}}`,
      task_definition: task.ref("arn", true),
      desired_count: `\${${v("quiesced")} ? 0 : 1}`,
      deployment_minimum_healthy_percent: 0,
      deployment_maximum_percent: 100,
      capacity_provider_strategy: [{ capacity_provider: `\${${v("capacity_provider")}}`, weight: 1 }],
      network_configuration: {
        subnets: `\${${v("subnet_ids")}}`,
        security_groups: [sg.ref("id", true)],
        assign_public_ip: false,
      },
      service_registries: { registry_arn: discovery.ref("arn", true) },
    }).gate(on);

    // Drain before deregister (the pattern of service_discovery.tf's other tiers): on create,
    // force a new deployment so the task registers in Cloud Map; on destroy, scale to zero and
    // wait, so no instance is left registered when the Cloud Map service goes.
    const reconcile = new Resource(this, "cloud_map_lifecycle", "terraform_data", {
      triggers_replace: [service.ref("id", true)],
      input: {
        cluster: `\${${v("cluster_arn")}}`,
        service: SERVICE_NAME,
        region: `\${${v("region")}}`,
      },
    }).gate(on);
    reconcile.addOverride("provisioner", [
      {
        "local-exec": {
          command: "aws ecs update-service --region ${self.input.region} --cluster ${self.input.cluster} " +
            "--service ${self.input.service} --force-new-deployment > /dev/null",
        },
      },
      {
        "local-exec": {
          when: "destroy",
          command: "aws ecs update-service --region ${self.input.region} --cluster ${self.input.cluster} " +
            "--service ${self.input.service} --desired-count 0 > /dev/null && " +
            "aws ecs wait services-stable --region ${self.input.region} --cluster ${self.input.cluster} " +
            "--services ${self.input.service}",
        },
      },
    ]);
    reconcile.addOverride("depends_on", [`aws_ecs_service.${service.friendlyUniqueId}`]);

    // --- Forgotten test mail: alarm on the sending MTA's queue logs -----------------------
    const watching = `${v("mta_log_group_name")} != ""`;
    new Resource(this, "forgotten_mail_filter", "aws_cloudwatch_log_metric_filter", {
      name: "sinkhole-test-mail-in-mta-logs",
      log_group_name: `\${${v("mta_log_group_name")}}`,
      pattern: '"sinkhole.test"',
      metric_transformation: {
        name: "SinkholeTestMailLogged",
        namespace: "Cabal/Sinkhole",
        value: "1",
        default_value: "0",
      },
    }).gate(watching);
    new Resource(this, "forgotten_mail_alarm", "aws_cloudwatch_metric_alarm", {
      alarm_name: "sinkhole-test-mail-forgotten",
      alarm_description: "sinkhole.test mail appears in the sending MTA's logs: a test message is queued or " +
        "retried. Put the sinkhole mode back and purge the queue (docs/runbook.md).",
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
      value: repo.ref("repository_url"),
      description: "ECR repository the image workflow pushes to.",
    });
    new TerraformOutput(this, "hostname", {
      value: hostname,
      description: "The name smtp-out routes sinkhole.test to (Cloud Map).",
    });
    new TerraformOutput(this, "parameter_name", {
      value: mode.ref("name"),
      description: "SSM parameter holding the mode: what ctl mode set writes.",
    });
    new TerraformOutput(this, "parameter_arn", {
      value: mode.ref("arn"),
      description: "ARN of that parameter, for IAM policies.",
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
      required_version: ">= 1.9",
      required_providers: { aws: { source: "hashicorp/aws", version: ">= 5.0" } },
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
