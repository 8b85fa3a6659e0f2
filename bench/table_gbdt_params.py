"""Candidates of the trees' settings (pipelines/gbdt.py) on the table suite's splits (bench/table_suite.py): test
accuracy or R² of the trees alone per candidate, beside HistGradientBoosting's on the same training rows.

    OMP_NUM_THREADS=1 python bench/table_gbdt_params.py     # 7 tables x 5 seeds; prints the means per table
"""
import json, sys, time
from pathlib import Path
import numpy as np, polars as pl
sys.path.insert(0, str(Path(__file__).resolve().parents[1])); sys.path.insert(0, str(Path(__file__).resolve().parent))
import table_sets, table_suite
from pipelines.tabular import prepare_table
from pipelines import gbdt

CANDS = {
  "lr05_p50": {},
  "lr1_100": {"learning_rate": 0.1, "fixed": 100},
  "lr05_p50_leaf10": {"min_data_in_leaf": 10},
  "lr03_p100_l15": {"learning_rate": 0.03, "num_leaves": 15, "patience": 100},
}
out = Path("runs/table_gbdt_params"); res = {}
seeds = [0, 1, 2, 3, 4]
for name, (_, target, task) in table_sets.TABLES.items():
    path = table_sets.build(name)
    for seed in seeds:
        d = out / name / f"seed{seed}"
        tr, te = table_suite.split_table(path, target, task, seed, d)
        data = prepare_table(tr, target=target, seed=seed)
        test = pl.read_csv(te, infer_schema=False)
        _, parsed, errors = data.prep.read_rows(te)
        xc, xn = data.prep.encode(parsed)
        truth = test[target].to_list()
        row = {}
        for cname, c in CANDS.items():
            p = dict(gbdt.PARAMS); saved = (gbdt.PARAMS.copy(), gbdt.MAX_ROUNDS, gbdt.PATIENCE)
            gbdt.PARAMS.update({k: v for k, v in c.items() if k in p})
            if "fixed" in c: gbdt.MAX_ROUNDS, gbdt.PATIENCE = c["fixed"], 10**6
            if "patience" in c: gbdt.PATIENCE = c["patience"]
            t0 = time.perf_counter()
            f = gbdt.train_gbdt(data, seed=seed, threads=1)
            s = time.perf_counter() - t0
            gbdt.PARAMS.clear(); gbdt.PARAMS.update(saved[0]); gbdt.MAX_ROUNDS, gbdt.PATIENCE = saved[1], saved[2]
            lo = f.model.logits(xc, xn)
            if task == "classification":
                pred = np.asarray(data.prep.classes)[lo.argmax(1)]
                sc = table_suite.scores(task, pred, truth)
            else:
                sc = table_suite.scores(task, data.prep.decode_target(lo[:, 0]), truth)
            row[cname] = {**sc, "seconds": round(s, 3), "rounds": f.model.spec.rounds}
        hgb = table_suite.run_hgb(tr, te, target, task, seed, data.rows[data.valid])
        row["hgb"] = hgb
        res.setdefault(name, []).append(row)
        print(name, seed, {k: (round(v.get("accuracy", v.get("r2", 0)), 3), v.get("rounds")) for k, v in row.items()}, flush=True)
(out / "summary.json").write_text(json.dumps(res))
for name, rows in res.items():
    key = "accuracy" if "accuracy" in rows[0]["hgb"] else "r2"
    print(name, {k: round(float(np.mean([r[k][key] for r in rows])), 4) for k in rows[0]})
