"""Reading base models: the linear-module map is safe to build from many threads at once."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_linear_modules_of_a_fresh_process_from_many_threads_at_once(llama_base: Path) -> None:
    # The first compositions of a server arrive together, before anything imported
    # transformers; its lazy module is not safe to import from several threads at once.
    script = textwrap.dedent(
        f"""
        import sys, threading
        from pathlib import Path
        from composer.basemodel import find_linear_modules, read_base_model

        layout = read_base_model(Path({str(llama_base)!r}))
        barrier = threading.Barrier(8)
        results, errors = [], []

        def build():
            barrier.wait()
            try:
                results.append(sorted(find_linear_modules(layout)))
            except BaseException as exc:
                errors.append(repr(exc))

        threads = [threading.Thread(target=build) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert "transformers" in sys.modules
        print(len(results), len(errors), len({{tuple(r) for r in results}}), len(results[0]) if results else 0)
        print(errors[:2])
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts, errors = proc.stdout.strip().splitlines()[-2:]
    done, failed, distinct, modules = map(int, counts.split())
    assert (done, failed, distinct) == (8, 0, 1), errors
    assert modules > 0
