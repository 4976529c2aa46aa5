"""Echoes params back, reports what it saw (argv, formats, task kinds) in the metrics, and
overwrites its own copy right after sending (what was sent must not change)."""

import sys

import fedcell.client as flare

flare.init()
while flare.is_running():
    model = flare.receive()
    params = model.params
    kinds = sorted({type(v).__module__.split(".")[0] for v in params.values()}) if params else []
    flare.send(
        flare.FLModel(
            params=params,
            metrics={
                "argv": sys.argv[1:],
                "kinds": kinds,
                "task": flare.get_task_name(),
                "train": flare.is_train(),
                "evaluate": flare.is_evaluate(),
                "submit": flare.is_submit_model(),
                "config": flare.get_config(),
            },
        )
    )
    for value in (params or {}).values():
        value[...] = 0
