"""`ansible-playbook site.yml --check --diff` on the converged fleet, as an operator runs
it before a change: it must complete, predict no change on any host and print no
warning (a false "changed" or warning in check mode teaches operators to ignore both).

It runs the scenario's converge playbook (site.yml) with the inventory and Ansible
configuration Molecule gives its own runs, taken from the verifier's environment.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

RECAP_LINE = re.compile(r"^(?P<host>\S+)\s+:\s+ok=\d+\s+changed=(?P<changed>\d+)\s", re.M)


def test_check_diff_on_the_converged_fleet_predicts_no_change_and_warns_nothing() -> None:
    inventory = Path(os.environ["MOLECULE_EPHEMERAL_DIRECTORY"]) / "inventory"
    playbook = Path(os.environ["MOLECULE_SCENARIO_DIRECTORY"]) / "converge.yml"
    run = subprocess.run(
        ["ansible-playbook", "--inventory", str(inventory), "--check", "--diff", str(playbook)],
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    recap = {m["host"]: int(m["changed"]) for m in RECAP_LINE.finditer(run.stdout)}
    assert {"rc-cache", "rc-client1", "rc-containerd", "rc-podman", "rc-mirror"} <= set(recap)
    changed = {host: n for host, n in recap.items() if n}
    assert not changed, (
        f"check mode predicts changes on a converged fleet: {changed}\n" + (output[-6000:])
    )
    warnings = [line for line in output.splitlines() if "[WARNING]" in line]
    assert not warnings, "\n".join(warnings)
