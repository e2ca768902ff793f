# tests/peer/ holds a script and pytest plugins that run other projects' suites (run.py); none of it is a test of
# the main suite, and importing the plugins outside their runs would patch PEFT and transformers for everything.
collect_ignore_glob = ["*.py"]
