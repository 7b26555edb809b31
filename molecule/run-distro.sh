#!/usr/bin/env bash
# molecule/run-distro.sh DISTRO [SCENARIO]: a scenario (default: `default`) on another Debian
# release's images (MOLECULE_DISTRO: trixie is Debian 13): create, prepare, converge,
# idempotence and verify, then destroy whatever happened. The side effects (refusals,
# rotation, absent) run on the Debian 12 images of `molecule test --all`; the roles'
# release-specific parts are what this run checks, in a third of the time.
set -uo pipefail
cd "$(dirname "$0")/.."
export MOLECULE_DISTRO=${1:?usage: run-distro.sh DISTRO [SCENARIO]}
scenario=${2:-default}
molecule=${MOLECULE:-.venv/bin/molecule}
SUITE=$MOLECULE_DISTRO bash molecule/images/build.sh || exit 1
"$molecule" destroy -s "$scenario" >/dev/null
status=0
for step in create prepare converge idempotence verify; do
  echo "molecule $scenario ($MOLECULE_DISTRO): $step"
  "$molecule" "$step" -s "$scenario" || { status=$?; break; }
done
"$molecule" destroy -s "$scenario" >/dev/null
exit "$status"
