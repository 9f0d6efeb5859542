#!/usr/bin/env bash
# Writes prometheusrule.yaml — cqrs.rules.yml wrapped in a Prometheus Operator PrometheusRule —
# for the kustomization here (which deploy/k8s/base includes). Run it after changing the rules;
# tests/monitoring/check_k8s.py fails while the rendered PrometheusRule differs from them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
{
    echo "# Generated from cqrs.rules.yml by gen-prometheusrule.sh: do not edit, run the script."
    echo "apiVersion: monitoring.coreos.com/v1"
    echo "kind: PrometheusRule"
    echo "metadata:"
    echo "  name: cqrs"
    echo "spec:"
    sed -e '/^#/d' -e 's/^\(.\)/  \1/' cqrs.rules.yml
} >prometheusrule.yaml
