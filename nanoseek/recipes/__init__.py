"""End-to-end pipelines (recipes) on one stage runner (nanoseek.recipes.stages): `lm` (real text)."""
