"""The watchdog process: trace sources, detectors and actions (incidents, kills, pages).

Entry points: `crewguard.supervisor.scan.Supervisor` (one scan) and
`crewguard.supervisor.daemon.run_supervisor` (the scheduled daemon).
"""
