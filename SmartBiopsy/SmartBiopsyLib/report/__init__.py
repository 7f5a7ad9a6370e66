"""The self-contained case report (report.html) written from a case folder: write_report in writer,
one module per section in sections/, figures and HTML helpers beside them."""
