#!/usr/bin/env bash
# benchmarks/stream.py --json with every core, then pinned (taskset) to 4 and to 2 cores.
#
#   benchmarks/stream_by_cores.sh [PYTHON] [OUT_DIR]
#
# Writes OUT_DIR/stream_<cores>.json (one benchmark object each) and prints the 1 GiB ratios.
# On two cores the four busy threads of a transfer (sender and receiver, event loop and ZeroMQ
# I/O thread each) share the cores; with four or more each gets its own (docs/benchmarks.md).
set -euo pipefail
python=${1:-.venv/bin/python}
out=${2:-.}
here=$(dirname "$0")
for cores in all 0-3 0-1; do
  pin=()
  [[ $cores != all ]] && pin=(taskset -c "$cores")
  "${pin[@]}" "$python" "$here/stream.py" --json >"$out/stream_$cores.json"
  "$python" - "$out/stream_$cores.json" "$cores" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
print(f"cores {sys.argv[2]:>4}: tcp {d['tcp_ratio_vs_zmq']:.3f}  ipc {d['ipc_ratio_vs_zmq']:.3f}  "
      f"receiver peak {d['recv_peak_rss_mib']:.0f} MiB  file to file {d['file_stream_peak_rss_mib']:.0f} MiB")
PY
done
