"""The README's CPU example runs as written, in a fresh interpreter (it sets TRITON_INTERPRET itself)."""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_cpu_example_runs_as_written(tmp_path):
    text = README.read_text()
    m = re.search(r"<!-- cpu-example[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert m, "README: the cpu-example block is missing"
    script = tmp_path / "cpu_example.py"
    script.write_text(m.group(1))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the example must set it itself
    env["CUDA_VISIBLE_DEVICES"] = ""
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    err = float(re.search(r"max \|triton - F.conv2d\|: (\S+)", r.stdout).group(1))
    assert err < 1e-4, r.stdout
    assert "weight gradients: [(8, 1, 13, 5), (8, 1, 5, 13), (8, 1, 5, 5)]" in r.stdout
    assert "logits: (2, 10)" in r.stdout
    assert "Warning" not in r.stderr, r.stderr
