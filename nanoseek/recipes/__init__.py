"""End-to-end pipelines (recipes) on one stage runner (nanoseek.recipes.stages): `demo` (R1-Zero), `r1`
(distillation vs RL on a dense student), `lm` (real text); their shared evaluation and report helpers in
nanoseek.recipes.report. A command module (nanoseek.commands) parses the options and calls the recipe."""
