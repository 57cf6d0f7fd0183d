"""Run analysis (forgetting curves, phases, disabling edits), installed as `seqedit.analysis`."""
