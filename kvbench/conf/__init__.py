"""Hydra's config tree, a package so that the installed app finds it (``pkg://kvbench.conf``)."""
