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

variable "environment" { type = string }
variable "sinkhole" {
  type    = bool
  default = false
}
variable "quiesced" {
  type    = bool
  default = false
}
variable "region" { type = string }
variable "cluster_arn" { type = string }
variable "capacity_provider" { type = string }
variable "vpc_id" { type = string }
variable "subnet_ids" { type = list(string) }
variable "vpc_cidr" { type = string }
variable "namespace_id" { type = string }
variable "mta_log_group_name" {
  type    = string
  default = ""
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
  value = module.sinkhole
}
