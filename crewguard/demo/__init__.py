"""`crewguard demo`: the whole system on one machine, no network and no keys.

`run.run_demo()` enqueues the bundled mailbox (`mailbox/*.eml`: support email for every category,
a few wired with `[[sim:...]]` markers to make the built-in scenario LLM loop, hang, spike tokens,
rate-limit, fail, answer out of bounds or obey a prompt injection, plus one file that is not an
email), runs the crew daemon and the supervisor (its own process) on a SQLite ledger in a data
folder, and prints a summary. `expected.json` says where each file should end up; `report` reads
the ledger back and compares.
"""
