"""The six benchmark cases, one module each; every module has `run(bench) -> CaseResult`."""
