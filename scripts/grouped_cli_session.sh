#!/bin/bash
# The grouped CLI session quoted in docs/guide.md ("Grouped continual learning"): two unrelated CoIN-mini sets and a
# paraphrase of the first, learned as one grouped lineage (30 steps per stage), with the decisions printed.
#   bash scripts/grouped_cli_session.sh OUT_DIR      (uses $LLACA_HOME, default OUT_DIR/home)
# stdout and stderr together, without tqdm bars and bitsandbytes' "kernels" import notice.
set -e
D=${1:?usage: grouped_cli_session.sh OUT_DIR}
cd "$(dirname "$0")/.."
export LLACA_HOME=${LLACA_HOME:-$D/home} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
PY=${PY:-.venv/bin/python}
run() { echo "\$ ${*/#$PY/python}"; "$@" 2>&1 | tr '\r' '\n' | { grep -v -e '%|' -e 'kernels' -e '^\s*$' || true; }; echo; }
question() { $PY -c "import json,sys; print(json.load(open(sys.argv[1]))[0]['conversations'][0]['value'].split('\n', 1)[1])" "$1"; }
$PY -m llaca coin-mini "$D/coin" --n-train 300 --n-test 50 > /dev/null
$PY -m llaca.data.paraphrase "$D/para" --n-train 300 --n-test 50 > /dev/null
run $PY -m llaca learn "$D/coin/sciqa/train" --grouped --max-steps 30 --name sciqa
run $PY -m llaca learn "$D/coin/gqa/train" --grouped --max-steps 30 --name gqa
run $PY -m llaca learn "$D/para/sciqa/train" --grouped --max-steps 30 --name sciqa-para
run $PY -m llaca learn "$D/para/sciqa/train" --grouped --threshold 0.5 --from v2 --max-steps 30 --name sciqa-para-t0.5
run $PY -m llaca versions
run $PY -m llaca ask v4 "$D/para/sciqa/test/images/00000.png" "$(question "$D/para/sciqa/test/data.json")"
run $PY -m llaca ask v4 "$D/coin/gqa/test/images/00000.png" "$(question "$D/coin/gqa/test/data.json")"
run $PY -m llaca eval v4 "$D/para/sciqa/test"
run $PY -m llaca eval v4 "$D/coin/gqa/test"
echo "\$ python -m llaca eval v4 $D/coin/gqa/test --json   # first 2 of 50 routing entries"
$PY -m llaca eval v4 "$D/coin/gqa/test" --json 2>/dev/null | $PY -c "
import json, sys; r = json.load(sys.stdin); print(json.dumps({**r, 'routing': r['routing'][:2]}))"
