#!/usr/bin/env bash
# The SASS of one launch of SKVQ's scores kernel at 64 rows x 1408 tokens (Nsight
# Compute's source page with executed instructions and stall samples), on a GPU:
#   bash benchmarks/skvq_fma/ncu_sass.sh OUT_DIR
# then `python benchmarks/sass_summary.py OUT_DIR/sass_skvq_scores_b64.csv.gz`.
# Kill any process still holding the GPU first: a process left by an earlier ncu run
# made the next one fail allocating and end in a segmentation fault.
set -uo pipefail
out=${1:-/tmp}
setsid timeout -s KILL 120 /usr/local/cuda/bin/ncu -k regex:skvq_decode_scores \
  --launch-skip 1 --launch-count 1 --section SourceCounters --section WarpStateStats \
  --page source --print-source sass --csv \
  python benchmarks/skvq_fma/ncu_target.py 64 1408 > $out/sass_skvq_scores_b64.csv
gzip -f $out/sass_skvq_scores_b64.csv
