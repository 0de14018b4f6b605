"""The large-batch study: grids of training cells (optimizer x batch x lr x seed at one token
budget) run through the training layer's public parts, turned into ``results.csv``, plots and
``report.md``. ``python -m merit_ds.study --help``; docs/study.md, "Large-batch study: does MERIT
keep its quality at large batch?"."""
