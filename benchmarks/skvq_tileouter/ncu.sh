#!/bin/bash
# ncu of SKVQ's two kernels (second step's launches)
which ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null
NCU=$(which ncu || ls /usr/local/cuda*/bin/ncu 2>/dev/null | head -1)
timeout ${1:-150} $NCU -k regex:skvq_decode --launch-skip 2 --launch-count 2 \
  --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
  --section SchedulerStats --section InstructionStats --section MemoryWorkloadAnalysis \
  python benchmarks/skvq_tileouter/ncu_target.py 64 1408 > $OUT/ncu_skvq_b64_l1408.txt 2>&1
echo "ncu rc=$?"; grep -E "Registers Per|Achieved Occupancy|Theoretical Occupancy|Duration|Executed Ipc A|Block Limit|Issue Slots Busy|No Eligible|Grid Size|Shared Memory Config|Dynamic Shared|Static Shared|Warp Cycles Per Issued" $OUT/ncu_skvq_b64_l1408.txt | head -60
