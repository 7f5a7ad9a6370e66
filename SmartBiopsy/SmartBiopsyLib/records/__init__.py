"""Records: the crash-safe specimen journal with pathology (specimen_journal), the procedure log
(procedure_log) and heterogeneity/cohort statistics (stats)."""
