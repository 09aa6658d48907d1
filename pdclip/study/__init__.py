"""The reproduction study: a grid of training runs, a resumable runner, aggregation and figures.

    python -m pdclip.study --preset quick --out runs/study-quick --results docs/results.md
    python -m pdclip.study --preset full --out runs/study --jobs 2 --results docs/results.md

A preset is plain data (`PRESETS`): shared training settings plus named experiments, each a product
of methods x settings x noise levels x training-set sizes x variants (LossConfig or TrainConfig
fields) x seeds. `expand` turns it into cells; a cell's id comes from its configuration only, so a
cell shared by two experiments runs once. `run_grid` skips cells whose `result.json` exists, so an
interrupted study resumes. Each result holds every `pdclip.evaluate` metric, the soft-target quality
over training and the wall time. The report turns the results into tables, figures and `docs/results.md`.

One concept per module; each imports only those listed before it (no cycles):

    presets    PRESETS, SETTINGS, HEADLINE, CONTROLS; expand / select a preset's cells
    results    the study folder: base.json and cells/<id>/result.json (check_base, load_results)
    runner     a cell's TrainConfig, one cell's run, the resumable (parallel) run_grid
    stats      mean_ci, aggregate, paired_gains, run_effective_robustness
    tables     the markdown tables (what a column reads, verdicts)
    figures    the report's PNG figures
    report     write_report: the generated blocks of docs/results.md
    __main__   the CLI above

This file imports nothing: `from pdclip.study import presets, runner` loads only what it names.
"""
