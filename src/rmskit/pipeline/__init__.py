"""The build pipeline: stages (registry + plain async functions), taxonomy, coverage and the
streaming runner that composes them. The public entry point is `rmskit.build(config)`."""
