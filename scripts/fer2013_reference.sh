#!/usr/bin/env bash
# The reference study on real data: FER2013's own split (train = Training_, val = PublicTest_,
# test = PrivateTest_), search_spaces/fer2013-cpu.yaml (vggcnn, minixception, smallcnn from scratch) on an
# idle 2-core CPU in under 2 hours, the report, and each best model and their ensemble on all 2,908
# PrivateTest images (the figure comparable with published models; the report also shows the PrivateTest
# images prepare kept).
#
#   bash scripts/fer2013_reference.sh [DATA] [STUDY]
#
# DATA: the 5-class FER2013 folders (default $FER_SHARED/datasets/fer2013-5class; research use only, never
# commit it). FER_SHARED: the folder holding datasets/fer2013-5class (required unless DATA is given; a space
# of yours may also name weights files under it). Rerunning after an interruption resumes the study.
# Overrides for a quick try: FER_SPACE (space file), FER_RESULTS (results folder), FER_STUDY (command,
# default fer-study).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${FER_SHARED:-}" ] || [ -n "${1:-}" ] || {
    echo "set FER_SHARED to the folder holding datasets/fer2013-5class, or pass DATA" >&2
    exit 2
}
export FER_SHARED="${FER_SHARED:-}"
DATA="${1:-$FER_SHARED/datasets/fer2013-5class}"
STUDY="${2:-fer2013-cpu}"
SPACE="${FER_SPACE:-search_spaces/fer2013-cpu.yaml}"
RESULTS="${FER_RESULTS:-results}"
read -r -a FER <<< "${FER_STUDY:-fer-study}"
[ -d "$DATA" ] || { echo "FER2013 not found at $DATA: set FER_SHARED or pass DATA" >&2; exit 2; }
start=$(date +%s)

if [ -f "$RESULTS/$STUDY/study.json" ]; then
    "${FER[@]}" run "$RESULTS/$STUDY" --space "$SPACE" --cpus-per-trial 1 --no-dashboard --resume
else
    "${FER[@]}" prepare "$DATA" --study "$STUDY" --results "$RESULTS" --image-size 48 \
        --predefined 'train=^Training_,val=^PublicTest_,test=^PrivateTest_'
    "${FER[@]}" run "$RESULTS/$STUDY" --space "$SPACE" --cpus-per-trial 1 --no-dashboard
fi
bests=("$RESULTS/$STUDY"/best/*/)
for best in "${bests[@]}"; do   # every PrivateTest image, duplicates included
    "${FER[@]}" evaluate "$best" "$DATA" --include '^PrivateTest_'
done
if [ "${#bests[@]}" -ge 2 ]; then   # the report's ensemble row, on the same 2,908 images
    "${FER[@]}" evaluate "${bests[@]}" "$DATA" --include '^PrivateTest_'
fi
"${FER[@]}" report "$RESULTS/$STUDY" --out "reports/$STUDY"
echo "reference study done in $(( $(date +%s) - start )) s: reports/$STUDY/report.html"
