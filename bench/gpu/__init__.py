"""The one-command GPU run (run.sh) and its helpers: profile, summary."""
