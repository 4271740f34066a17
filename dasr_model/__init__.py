"""dasr_model: the DASR network and trainer (spec: shared/spec/model.md). Not implemented yet (issue 5)."""
