"""benchmarks/gpu_session.sh, the GPU runbook: a mistake in it costs device minutes, so its
syntax, its parts and its Python snippets are checked here, without a GPU."""
import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_session.sh"


def test_the_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_every_part_in_its_usage_lines_is_handled():
    text = SCRIPT.read_text()
    usage = set(re.findall(r"^#\s+bash benchmarks/gpu_session\.sh ([a-z0-9 -]+?)\s+#", text, re.M))
    named = {part for line in usage for part in line.split()}
    handled = set(re.findall(r"^    ([a-z0-9-]+)\)", text, re.M))
    assert named and named <= handled, named - handled


def test_its_python_snippets_compile():
    text = SCRIPT.read_text()
    snippets = dict(re.findall(r"^([A-Z_]+)='\n(.*?)\n'$", text, re.M | re.S))
    assert {"PROFILE_KERNELS", "PROFILE_DECODE", "PREFETCH_AB"} <= snippets.keys()
    for name, source in snippets.items():
        compile(source, name, "exec")
