"""The six cases of issue 7, one module each; every module has `run(bench) -> CaseResult`."""
