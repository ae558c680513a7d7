"""The engine without the pipeline (`make engine-demo`): experiment tables and plots, tuned variants over
seeds and their spread report, compact-model export."""
