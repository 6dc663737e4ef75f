# Root configuration used by .github/workflows/infra.yml: one state per environment
# (the S3 bucket and key come from -backend-config), the module from ../module.
terraform {
  required_version = ">= 1.9"
  backend "s3" {}
  required_providers {
    aws = { source = "hashicorp/aws", version = ">= 5.0" }
  }
}

provider "aws" {
  region = var.region
}

variable "environment" {
  type        = string
  description = "Environment name (development, stage); production is refused by the module's guard."
}
variable "sinkhole" {
  type        = bool
  default     = false
  description = "Run the sinkhole tier in this environment."
}
variable "quiesced" {
  type        = bool
  default     = false
  description = "Scale the tier to zero, keeping its Cloud Map name (the runbook's offline test)."
}
variable "region" {
  type        = string
  description = "AWS region of the cluster."
}
variable "cluster_arn" {
  type        = string
  description = "ARN of the existing ECS cluster."
}
variable "capacity_provider" {
  type        = string
  description = "EC2 capacity provider of the cluster."
}
variable "vpc_id" {
  type        = string
  description = "VPC of the cluster."
}
variable "subnet_ids" {
  type        = list(string)
  description = "Private subnets for the task ENI."
}
variable "vpc_cidr" {
  type        = string
  description = "Only this CIDR may reach port 25."
}
variable "namespace_id" {
  type        = string
  description = "Cloud Map private DNS namespace id (cabal.internal)."
}
variable "mta_log_group_name" {
  type        = string
  default     = ""
  description = "The sending MTA's log group, watched for forgotten sinkhole.test mail; empty: no alarm."
}

module "sinkhole" {
  source             = "../module"
  environment        = var.environment
  sinkhole           = var.sinkhole
  quiesced           = var.quiesced
  region             = var.region
  cluster_arn        = var.cluster_arn
  capacity_provider  = var.capacity_provider
  vpc_id             = var.vpc_id
  subnet_ids         = var.subnet_ids
  vpc_cidr           = var.vpc_cidr
  namespace_id       = var.namespace_id
  mta_log_group_name = var.mta_log_group_name
}

output "sinkhole" {
  value       = module.sinkhole
  description = "Every output of the module (repository, hostname, parameter, smtp-out settings)."
}
