"""JSON files that are JSON: a NaN or infinite float is written as null and named in a warning line.

Python's json writes NaN and Infinity bare, which is not JSON: strict readers (JavaScript, jq, most languages, a
browser showing the file) refuse the whole file. A dev metric is NaN when it is undefined (the Spearman of gold
scores that never vary), so train_summary.json, eval_results.json, trainer_state.json and run_cmteb's reports are all
written here. Reading such a file back gives None where the value was not finite.
"""

import json
import math
import sys
from pathlib import Path


def finite_json(value, where=""):
    """``value`` with every NaN or infinite float replaced by None (tuples become lists, as json writes them), and
    where each was: ["steps.0.spearman = nan", "rates[1] = inf", ...]."""
    if isinstance(value, float) and not math.isfinite(value):
        return None, [f"{where} = {value}"]
    if isinstance(value, dict):
        items = [(key, *finite_json(item, f"{where}.{key}" if where else str(key))) for key, item in value.items()]
        return {key: item for key, item, _ in items}, [place for _, _, places in items for place in places]
    if isinstance(value, (list, tuple)):
        items = [finite_json(item, f"{where}[{index}]") for index, item in enumerate(value)]
        return [item for item, _ in items], [place for _, places in items for place in places]
    return value, []


def write_json(path, value, warn=True, **dumps_options):
    """Write ``value`` to ``path`` as strict JSON (indented by 2 unless ``dumps_options`` say otherwise); each value
    that was not finite is written as null and, with ``warn``, named in one line on stderr. Returns those places."""
    clean, replaced = finite_json(value)
    text = json.dumps(clean, allow_nan=False, **{"indent": 2, **dumps_options})
    Path(path).write_text(text + "\n", encoding="utf-8")
    if replaced and warn:
        print(f"warning: {path}: not finite, written as null: {'; '.join(replaced)}", file=sys.stderr, flush=True)
    return replaced
