#!/usr/bin/env bash
# The vmform steps of the pipelines in this directory, in one place: github-actions.yml and gitlab-ci.yml
# call this script, and vmform's own test suite runs it against a real libvirtd
# (tests/integration/test_gitops.py), so what CI does is what was tested.
#
#   vmform-ci.sh check         fmt --check and validate: no libvirt connection needed
#   vmform-ci.sh plan          plan -out $PLAN_FILE, with plan.md (a PR comment) and plan.json beside it
#   vmform-ci.sh apply         apply exactly $PLAN_FILE (refused if the host or manifests changed since),
#                              waiting up to $LOCK_TIMEOUT seconds for another apply of the project
#   vmform-ci.sh drift         plan --detailed-exitcode: exit 0 in sync, 2 drift (drift.md says what), 1 error
#
# Environment: VMFORM (the command, default "vmform"), PLAN_FILE (default vmform.plan), LOCK_TIMEOUT
# (default 600), OUT_DIR (where plan.md, plan.json and drift.md go; default: the current directory).
set -euo pipefail

VMFORM=${VMFORM:-vmform}
PLAN_FILE=${PLAN_FILE:-vmform.plan}
LOCK_TIMEOUT=${LOCK_TIMEOUT:-600}
OUT_DIR=${OUT_DIR:-.}
export NO_COLOR=1

case "${1:-}" in
    check)
        $VMFORM fmt --check
        $VMFORM validate
        ;;
    plan)
        $VMFORM plan -out "$PLAN_FILE" --format markdown >"$OUT_DIR/plan.md"
        $VMFORM show --json "$PLAN_FILE" >"$OUT_DIR/plan.json"
        cat "$OUT_DIR/plan.md"
        ;;
    apply)
        $VMFORM apply --lock-timeout "$LOCK_TIMEOUT" "$PLAN_FILE"
        ;;
    drift)
        rc=0
        $VMFORM plan --detailed-exitcode --format markdown >"$OUT_DIR/drift.md" || rc=$?
        cat "$OUT_DIR/drift.md"
        if [ "$rc" -eq 2 ]; then
            echo "drift: the host differs from the manifests (see above)" >&2
        fi
        exit "$rc"
        ;;
    *)
        echo "usage: $0 check|plan|apply|drift" >&2
        exit 64
        ;;
esac
