"""The engine without the pipeline (`make engine-demo`): experiment tables and plots, compact-model export."""
