# The root .github/workflows/infra.yml runs: one state per environment (bucket, key and
# region from -backend-config), the module from ../module. Everything about an environment
# comes from ctl/environments.json, the one file ctl and the workflows read too; existing
# Cabalmail resources are looked up by the names written there, never asked for by id.
# The workflow sets exactly three variables (TF_VAR_environment, TF_VAR_sinkhole,
# TF_VAR_quiesced); tests/infra_test.ts holds it to that.
terraform {
  required_version = ">= 1.10"
  backend "s3" {
    use_lockfile = true
  }
  required_providers {
    aws = { source = "hashicorp/aws", version = "5.100.0" }
  }
}

variable "environment" {
  type        = string
  description = "The environment: a key of ctl/environments.json (development, stage). Production is never one."
  validation {
    condition     = contains(keys(jsondecode(file("${path.module}/../../ctl/environments.json"))), var.environment)
    error_message = "Not an environment of ctl/environments.json (development, stage); sinkhole has none in production."
  }
}
variable "sinkhole" {
  type        = bool
  default     = false
  description = "Run the sinkhole tier in this environment (the environment's SINKHOLE variable)."
}
variable "quiesced" {
  type        = bool
  default     = false
  description = "Scale the tier to zero, keeping its Cloud Map name (the environment's QUIESCED variable)."
}

locals {
  env = jsondecode(file("${path.module}/../../ctl/environments.json"))[var.environment]
}

provider "aws" {
  region = local.env.region
  default_tags {
    tags = {
      environment          = var.environment
      managed_by_terraform = "y"
      terraform_repo       = "sinkhole"
    }
  }
}

# What Cabalmail already runs, by name.
data "aws_ecs_cluster" "mail" {
  cluster_name = local.env.cluster
}
data "aws_vpc" "mail" {
  tags = { Name = local.env.vpcName }
}
data "aws_subnets" "private" {
  filter {
    name   = "vpc-id"
    values = [data.aws_vpc.mail.id]
  }
  filter {
    name   = "tag:Name"
    values = [local.env.privateSubnetNames]
  }
}
data "aws_service_discovery_dns_namespace" "mail" {
  name = local.env.namespace
  type = "DNS_PRIVATE"
}

module "sinkhole" {
  source                   = "../module"
  environment              = var.environment
  cluster_tags             = data.aws_ecs_cluster.mail.tags
  sinkhole                 = var.sinkhole
  quiesced                 = var.quiesced
  region                   = local.env.region
  cluster_arn              = data.aws_ecs_cluster.mail.arn
  cluster_name             = data.aws_ecs_cluster.mail.cluster_name
  capacity_provider        = local.env.capacityProvider
  vpc_id                   = data.aws_vpc.mail.id
  subnet_ids               = data.aws_subnets.private.ids
  vpc_cidr                 = data.aws_vpc.mail.cidr_block
  namespace_id             = data.aws_service_discovery_dns_namespace.mail.id
  namespace_name           = local.env.namespace
  mode_parameter_name      = local.env.parameter
  image_tag_parameter_name = local.env.imageTagParameter
  cache_ttl_seconds        = local.env.cacheTtlSeconds
  mta_log_group_name       = local.env.mtaLogGroup
  service_name             = local.env.sinkholeService
  log_group_name           = local.env.sinkholeLogGroup
}

output "sinkhole" {
  value       = module.sinkhole
  description = "Every output of the module (repository, hostname, parameters, image, smtp-out settings)."
}
