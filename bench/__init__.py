"""`make bench`: the proxy measured side by side with what users would run instead.

Everything runs on loopback and is started and stopped here: Debian's docker-registry
over TLS as the upstream (holding a generated image), the proxy, nginx serving the same
blobs over TLS, and docker-registry in pull-through mode as the peer cache. The figures
and their targets are those of issue 7; `python -m bench --quick` runs a reduced version.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
# The integration harness (test CA, registry runner, image generator, proxy runner) lives
# in tests/support and is imported from there, not copied.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
