"""Trainers. common (optimizer, schedule, distributed), checkpoint and metrics are shared; pretrain is the loop."""
