"""core/online is plain Python: importing it loads neither Prefect nor torch (nor RecBole)."""

from __future__ import annotations

import subprocess
import sys


def test_core_online_imports_no_prefect_torch_or_recbole() -> None:
    code = ("import sys\n"
            "import core.online.ab_stats, core.online.analysis, core.online.drift, core.online.outcomes\n"
            "import core.online.profile, core.online.report, core.online.settings, core.online.simulate\n"
            "print(sorted(m for m in ('prefect', 'torch', 'recbole') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
