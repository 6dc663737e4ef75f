# Cabalmail's account as cabal-infra's own Terraform leaves it, for tests/infra_test.ts: the
# resources this project meets there, translated from cabal-infra (the mirror's HEAD,
# 56bdbf2e9eea076220e58e7dbb845bac12d62a5b) resource by resource, each citing its file and lines.
# Written here, not copied: only what sinkhole meets (ECR, the tag parameters, the network, the
# cluster and its capacity, the namespace, the execution and instance roles, the tier log groups,
# and with var.sinkhole the whole of modules/ecs/sinkhole.tf). The test applies it into moto,
# runs this project's paths on top, and plans it again: no change to anything it owns.
#
# Where moto cannot take cabal-infra's resource as written, the deviation is said beside it.

terraform {
  required_version = ">= 1.10"
  required_providers {
    aws = { source = "hashicorp/aws", version = "5.100.0" }
  }
}

variable "environment" {
  type = string
}
variable "aws_region" {
  type = string
}
variable "sinkhole" {
  # terraform/infra/variables.tf:129-137
  type    = bool
  default = false
}
variable "quiesced" {
  # terraform/infra/variables.tf:145-149
  type    = bool
  default = false
}
variable "cidr_block" {
  # terraform/infra/variables.tf:61; docs/github.md's example value
  type    = string
  default = "10.0.0.0/16"
}
variable "deploy_role_arn" {
  # terraform/infra/variables.tf:193-197: the CI role (docs/aws.md step 7, made by hand, not by Terraform)
  type    = string
  default = ""
}
variable "repo" {
  # terraform/infra/variables.tf:70-74
  type    = string
  default = "https://github.com/ccarr-cabal/cabal-infra/tree/main"
}

# terraform/infra/providers.tf:1-10
provider "aws" {
  region = var.aws_region
  default_tags {
    tags = {
      environment          = var.environment
      managed_by_terraform = "y"
      terraform_repo       = var.repo
    }
  }
}

data "aws_caller_identity" "current" {}

locals {
  # terraform/infra/main.tf:40-56
  core_mail_tiers = ["imap", "smtp-in", "smtp-out"]
  monitoring_tiers = [
    "uptime-kuma", "ntfy", "healthchecks", "prometheus", "alertmanager", "grafana",
    "cloudwatch-exporter", "blackbox-exporter", "node-exporter",
  ]
  docker_tiers       = concat(local.core_mail_tiers, ["sinkhole"], local.monitoring_tiers)
  bootstrap_sentinel = "bootstrap-placeholder"
  # terraform/infra/main.tf:315-328
  ecs_instance_role_arn  = "arn:aws:iam::${data.aws_caller_identity.current.account_id}:role/cabal-ecs-instance-role"
  ecs_execution_role_arn = "arn:aws:iam::${data.aws_caller_identity.current.account_id}:role/cabal-ecs-execution-role"
  ecr_deploy_pull_arns   = var.deploy_role_arn == "" ? [] : [var.deploy_role_arn]
  ecr_pull_principals_by_repo = {
    for tier in concat(local.core_mail_tiers, ["sinkhole"]) :
    tier => concat([local.ecs_execution_role_arn, local.ecs_instance_role_arn], local.ecr_deploy_pull_arns)
  }
  # modules/ecs/locals.tf:9-33 (the tiers' names)
  tiers = toset(local.core_mail_tiers)
}

# -- Image tags: terraform/infra/main.tf:30-83 ------------------------------------------
# The legacy global key is hand-provisioned at account genesis (main.tf:23-25): the test puts it.
data "aws_ssm_parameter" "deployed_image_tag" {
  name = "/cabal/deployed_image_tag"
}
resource "aws_ssm_parameter" "tier_image_tag" {
  for_each    = toset(local.docker_tiers)
  name        = "/cabal/deployed_image_tag/${each.value}"
  description = "Image tag running on the cabal-${each.value} tier. Written by .github/scripts/refresh-ssm-from-running.sh; Terraform only seeds it."
  type        = "String"
  value       = local.bootstrap_sentinel
  lifecycle {
    ignore_changes = [value]
  }
}
locals {
  tier_image_tags = {
    for tier in local.docker_tiers :
    tier => (
      aws_ssm_parameter.tier_image_tag[tier].value == local.bootstrap_sentinel
      ? data.aws_ssm_parameter.deployed_image_tag.value
      : aws_ssm_parameter.tier_image_tag[tier].value
    )
  }
}

# -- ECR: modules/ecr/main.tf -------------------------------------------------------------
resource "aws_ecr_repository" "tier" {
  # Three resources there, one here (the same settings; each key's repository as there):
  # :5-18 the core mail tiers (var.tiers defaults to them: modules/ecr/variables.tf);
  # :25-42 the monitoring tiers (prevent_destroy left out: the test throws the whole account away);
  # :51-67 cabal-sinkhole, always, whatever var.sinkhole says.
  for_each             = toset(local.docker_tiers)
  name                 = "cabal-${each.key}"
  image_tag_mutability = "IMMUTABLE"
  force_delete         = false
  image_scanning_configuration {
    scan_on_push = true
  }
  encryption_configuration {
    encryption_type = "AES256"
  }
}
locals {
  # :69-85
  all_repositories = aws_ecr_repository.tier
  ecr_pull_actions = ["ecr:GetDownloadUrlForLayer", "ecr:BatchGetImage", "ecr:BatchCheckLayerAvailability"]
}
resource "aws_ecr_repository_policy" "pull_restriction" {
  # :104-133
  for_each   = { for key, repo in local.all_repositories : key => repo if contains(keys(local.ecr_pull_principals_by_repo), key) }
  repository = each.value.name
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Sid       = "AllowPullForCabalPrincipals"
        Effect    = "Allow"
        Principal = { AWS = local.ecr_pull_principals_by_repo[each.key] }
        Action    = local.ecr_pull_actions
      },
      {
        Sid       = "DenyPullForOtherPrincipals"
        Effect    = "Deny"
        Principal = "*"
        Action    = local.ecr_pull_actions
        Condition = { ArnNotLike = { "aws:PrincipalArn" = local.ecr_pull_principals_by_repo[each.key] } }
      },
    ]
  })
  # ECR validates that named principals exist (main.tf:306-307).
  depends_on = [aws_iam_role.service]
}
resource "aws_ecr_lifecycle_policy" "tier" {
  # :135-169
  for_each   = local.all_repositories
  repository = each.value.name
  policy = jsonencode({
    rules = [
      {
        rulePriority = 1
        description  = "Keep last 10 tagged images"
        selection    = { tagStatus = "tagged", tagPrefixList = ["sha-"], countType = "imageCountMoreThan", countNumber = 10 }
        action       = { type = "expire" }
      },
      {
        rulePriority = 2
        description  = "Expire untagged images after 7 days"
        selection    = { tagStatus = "untagged", countType = "sinceImagePushed", countUnit = "days", countNumber = 7 }
        action       = { type = "expire" }
      }
    ]
  })
}

# -- Network: modules/vpc/main.tf:5-11, modules/vpc/subnets.tf:1-19 ------------------------
resource "aws_vpc" "network" {
  cidr_block           = var.cidr_block
  enable_dns_hostnames = true
  tags                 = { Name = "cabal-vpc" }
}
locals {
  az_list = ["${var.aws_region}a", "${var.aws_region}b"]
}
resource "aws_subnet" "private" {
  count             = length(local.az_list)
  vpc_id            = aws_vpc.network.id
  availability_zone = local.az_list[count.index]
  cidr_block        = cidrsubnet(var.cidr_block, 8, count.index)
  tags              = { Name = "cabal-private-subnet-${count.index}" }
}
resource "aws_subnet" "public" {
  count             = length(local.az_list)
  vpc_id            = aws_vpc.network.id
  availability_zone = local.az_list[count.index]
  cidr_block        = cidrsubnet(var.cidr_block, 8, length(local.az_list) + count.index)
  tags              = { Name = "cabal-public-subnet-${count.index}" }
}

# -- IAM: modules/ecs/iam.tf:15-31, 151-172 ------------------------------------------------
resource "aws_iam_role" "service" {
  # Three roles there, one resource here (a role a service assumes, by name):
  # ecs_execution, iam.tf:15-31; ecs_instance, iam.tf:151-172; sinkhole_task, modules/ecs/sinkhole.tf:87-99
  # (with var.sinkhole only, as its count there).
  for_each = merge(
    {
      ecs_execution = { name = "cabal-ecs-execution-role", service = "ecs-tasks.amazonaws.com" }
      ecs_instance  = { name = "cabal-ecs-instance-role", service = "ec2.amazonaws.com" }
    },
    var.sinkhole ? { sinkhole_task = { name = "cabal-ecs-sinkhole-task-role", service = "ecs-tasks.amazonaws.com" } } : {},
  )
  name = each.value.name
  assume_role_policy = jsonencode({
    Version   = "2012-10-17"
    Statement = [{ Action = "sts:AssumeRole", Effect = "Allow", Principal = { Service = each.value.service } }]
  })
}
resource "aws_iam_role_policy_attachment" "ecs_execution_managed" {
  role       = aws_iam_role.service["ecs_execution"].name
  policy_arn = "arn:aws:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"
}

# -- Cluster and capacity: modules/ecs/main.tf:37-44, 129-154 -------------------------------
resource "aws_ecs_cluster" "mail" {
  name = "cabal-mail"
  setting {
    name  = "containerInsights"
    value = "enabled"
  }
}
resource "aws_ecs_capacity_provider" "ec2" {
  name = "cabal-ec2"
  auto_scaling_group_provider {
    # Deviation: cabal-infra's aws_autoscaling_group.ecs (main.tf:93-125) launches the
    # ECS-optimized arm64 AMI, which moto does not hold; the provider names an ASG by ARN.
    auto_scaling_group_arn         = "arn:aws:autoscaling:${var.aws_region}:${data.aws_caller_identity.current.account_id}:autoScalingGroup:1:autoScalingGroupName/cabal-ecs-1"
    managed_termination_protection = var.quiesced ? "DISABLED" : "ENABLED"
    managed_scaling {
      status          = "ENABLED"
      target_capacity = 100
    }
  }
}
resource "aws_ecs_cluster_capacity_providers" "mail" {
  cluster_name       = aws_ecs_cluster.mail.name
  capacity_providers = [aws_ecs_capacity_provider.ec2.name]
  default_capacity_provider_strategy {
    capacity_provider = aws_ecs_capacity_provider.ec2.name
    weight            = 100
  }
}
resource "aws_cloudwatch_log_group" "tier" {
  # modules/ecs/main.tf:190-194 (smtp-out's is the one the forgotten-mail alarm watches)
  for_each          = local.tiers
  name              = "/ecs/cabal-${each.key}"
  retention_in_days = 365
}

# -- Namespace: modules/ecs/service_discovery.tf:19-29 --------------------------------------
resource "aws_service_discovery_private_dns_namespace" "mail" {
  name        = "cabal.internal"
  description = "Internal service discovery for ECS mail tiers"
  vpc         = aws_vpc.network.id
}

# -- The sinkhole tier: modules/ecs/sinkhole.tf, whole ---------------------------------------
resource "aws_security_group" "sinkhole" {
  # :27-32
  count       = var.sinkhole ? 1 : 0
  name        = "cabal-ecs-sinkhole-sg"
  description = "Allow sinkhole inbound port 25 from VPC"
  vpc_id      = aws_vpc.network.id
}
resource "aws_security_group_rule" "sinkhole_egress" {
  # :34-44
  count             = var.sinkhole ? 1 : 0
  type              = "egress"
  protocol          = "-1"
  from_port         = 0
  to_port           = 0
  cidr_blocks       = ["0.0.0.0/0"]
  ipv6_cidr_blocks  = ["::/0"]
  description       = "Allow all outgoing (SSM API calls + ECR pulls)"
  security_group_id = aws_security_group.sinkhole[0].id
}
resource "aws_security_group_rule" "sinkhole_ingress_vpc" {
  # :46-55
  count             = var.sinkhole ? 1 : 0
  type              = "ingress"
  protocol          = "tcp"
  from_port         = 25
  to_port           = 25
  cidr_blocks       = [var.cidr_block]
  description       = "Allow incoming port 25 sinkhole from VPC"
  security_group_id = aws_security_group.sinkhole[0].id
}
resource "aws_cloudwatch_log_group" "sinkhole" {
  # :59-63
  count             = var.sinkhole ? 1 : 0
  name              = "/ecs/cabal-sinkhole"
  retention_in_days = 365
}
resource "aws_ssm_parameter" "sinkhole_mode" {
  # :70-80
  count       = var.sinkhole ? 1 : 0
  name        = "/cabal/sinkhole_mode"
  description = "Sinkhole response mode: defer, bounce, accept, accept-log, greylist. See docs/0.9.x/sinkhole-test-harness-plan.md."
  type        = "String"
  value       = "defer"
  lifecycle {
    ignore_changes = [value]
  }
}
resource "aws_iam_policy" "sinkhole_task" {
  # :101-130
  count       = var.sinkhole ? 1 : 0
  name        = "cabal-ecs-sinkhole-task-access"
  description = "Runtime permissions for the sinkhole listener: read /cabal/sinkhole_mode and open an SSM session for exec."
  policy = jsonencode({
    Version = "2012-10-17"
    Statement = [
      {
        Effect   = "Allow"
        Action   = ["ssm:GetParameter"]
        Resource = "arn:aws:ssm:${var.aws_region}:${data.aws_caller_identity.current.account_id}:parameter/cabal/sinkhole_mode"
      },
      {
        Effect   = "Allow"
        Action   = ["ssmmessages:CreateControlChannel", "ssmmessages:CreateDataChannel", "ssmmessages:OpenControlChannel", "ssmmessages:OpenDataChannel"]
        Resource = "*"
      },
    ]
  })
}
resource "aws_iam_role_policy_attachment" "sinkhole_task" {
  # :132-136
  count      = var.sinkhole ? 1 : 0
  role       = aws_iam_role.service["sinkhole_task"].name
  policy_arn = aws_iam_policy.sinkhole_task[0].arn
}
resource "aws_service_discovery_service" "sinkhole" {
  # :145-163
  count = var.sinkhole ? 1 : 0
  name  = "sinkhole"
  dns_config {
    namespace_id = aws_service_discovery_private_dns_namespace.mail.id
    dns_records {
      ttl  = 10
      type = "A"
    }
    routing_policy = "MULTIVALUE"
  }
  lifecycle {
    ignore_changes = [health_check_custom_config]
  }
}
resource "terraform_data" "sinkhole_cloud_map_lifecycle" {
  # :170-215 (the same two commands; the aws CLI reaches moto through AWS_ENDPOINT_URL. Deviation:
  # this machine's aws CLI is v1, which has no --no-cli-pager; the test sets AWS_PAGER="" instead)
  count            = var.sinkhole ? 1 : 0
  triggers_replace = [aws_service_discovery_service.sinkhole[0].id, var.quiesced]
  input = {
    cluster_name     = aws_ecs_cluster.mail.name
    ecs_service_name = aws_ecs_service.sinkhole[0].name
    region           = var.aws_region
    desired_count    = var.quiesced ? 0 : 1
  }
  provisioner "local-exec" {
    when    = destroy
    command = "aws --region ${self.input.region} ecs update-service --cluster ${self.input.cluster_name} --service ${self.input.ecs_service_name} --desired-count 0 >/dev/null && aws --region ${self.input.region} ecs wait services-stable --cluster ${self.input.cluster_name} --services ${self.input.ecs_service_name}"
  }
  provisioner "local-exec" {
    command = "aws --region ${self.input.region} ecs update-service --cluster ${self.input.cluster_name} --service ${self.input.ecs_service_name} --desired-count ${self.input.desired_count} --force-new-deployment >/dev/null"
  }
  depends_on = [aws_ecs_service.sinkhole]
}
locals {
  # modules/ecs/locals.tf:45-58 (sinkhole's entry)
  placeholder_image = "public.ecr.aws/nginx/nginx:stable"
  sinkhole_image    = local.tier_image_tags["sinkhole"] == local.bootstrap_sentinel ? local.placeholder_image : "${aws_ecr_repository.tier["sinkhole"].repository_url}:${local.tier_image_tags["sinkhole"]}"
}
resource "aws_ecs_task_definition" "sinkhole" {
  # :225-275
  count                    = var.sinkhole ? 1 : 0
  family                   = "cabal-sinkhole"
  requires_compatibilities = ["EC2"]
  network_mode             = "awsvpc"
  execution_role_arn       = aws_iam_role.service["ecs_execution"].arn
  task_role_arn            = aws_iam_role.service["sinkhole_task"].arn
  container_definitions = jsonencode([{
    name              = "sinkhole"
    image             = local.sinkhole_image
    essential         = true
    memoryReservation = 64
    memory            = 128
    portMappings      = [{ containerPort = 25, protocol = "tcp" }]
    environment = [
      { name = "TIER", value = "sinkhole" },
      { name = "AWS_REGION", value = var.aws_region },
      { name = "SINKHOLE_MODE_PARAM", value = aws_ssm_parameter.sinkhole_mode[0].name },
    ]
    logConfiguration = {
      logDriver = "awslogs"
      options = {
        "awslogs-group"         = aws_cloudwatch_log_group.sinkhole[0].name
        "awslogs-region"        = var.aws_region
        "awslogs-stream-prefix" = "sinkhole"
        "mode"                  = "non-blocking"
      }
    }
  }])
  lifecycle {
    ignore_changes = [container_definitions]
    precondition {
      condition     = !(var.sinkhole && var.environment == "prod")
      error_message = "Sinkhole tier must never run in prod. See docs/0.9.x/sinkhole-test-harness-plan.md."
    }
  }
}
resource "aws_ecs_service" "sinkhole" {
  # :279-314
  count                              = var.sinkhole ? 1 : 0
  name                               = "cabal-sinkhole"
  cluster                            = aws_ecs_cluster.mail.id
  task_definition                    = aws_ecs_task_definition.sinkhole[0].arn
  desired_count                      = var.quiesced ? 0 : 1
  enable_execute_command             = true
  deployment_maximum_percent         = 100
  deployment_minimum_healthy_percent = 0
  capacity_provider_strategy {
    capacity_provider = aws_ecs_capacity_provider.ec2.name
    weight            = 100
  }
  network_configuration {
    subnets         = aws_subnet.private[*].id
    security_groups = [aws_security_group.sinkhole[0].id]
  }
  service_registries {
    registry_arn = aws_service_discovery_service.sinkhole[0].arn
  }
  depends_on = [aws_ecs_cluster_capacity_providers.mail]
  lifecycle {
    ignore_changes = [task_definition]
  }
}

output "sinkhole_image" {
  value = var.sinkhole ? nonsensitive(local.sinkhole_image) : ""
}
