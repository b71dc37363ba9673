"""crewguard: an email-triage crew that keeps working in production."""
