"""Print, as JSON, the --help of each script named, each run as `python SCRIPT --help` runs
it, all in one process so that TensorFlow loads once:

    python tests/help_texts.py train.py benchmarks/benchmark.py
"""

import contextlib
import io
import json
import runpy
import sys
from pathlib import Path

texts = {}
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    sys.path.insert(0, str(Path(script).resolve().parent))  # as python puts the script's folder first
    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text), contextlib.suppress(SystemExit):
        runpy.run_path(script, run_name="__main__")
    texts[script] = help_text.getvalue()
print(json.dumps(texts))
