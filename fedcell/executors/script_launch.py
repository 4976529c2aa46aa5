"""Entry point of a ScriptRunner child process: ``python -m fedcell.executors.script_launch
script.py ARGS...``.

It runs the script exactly as ``python script.py ARGS...`` would (``__name__ == "__main__"``,
``sys.argv == [script.py, *ARGS]``, the script's folder first on ``sys.path``) and exists for one
reason: to tell a script that *raised* from one that *died*. An exception escaping the script is
reported to the site with its traceback (connecting first if the script never reached
``flare.init()``), printed to stderr as Python would, and the process exits with status 1; the
site then marks the task *failed*. An exit without that report (``sys.exit``, a signal, a
segfault, an early return) is *crashed*. The session is closed before the interpreter exits.
"""

from __future__ import annotations

import runpy
import sys
import traceback
from pathlib import Path

from fedcell.executors.script_process import close_script_session, report_script_failure
from fedcell.executors.script_protocol import format_script_error


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m fedcell.executors.script_launch SCRIPT [ARGS...]")
    script = Path(sys.argv[1])
    sys.argv = [str(script), *sys.argv[2:]]
    sys.path[0] = str(script.resolve().parent)
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit:
        raise
    except BaseException as exc:
        text = format_script_error(exc, script)
        sys.stderr.write(text)
        try:
            report_script_failure(text)
        except Exception:
            traceback.print_exc()
        sys.exit(1)
    finally:
        close_script_session()


if __name__ == "__main__":
    main()
