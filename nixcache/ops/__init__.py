"""One operation each: upload, publish, collect, du, verify, hand-run roots commands.

I/O goes through bucket/ and local/."""
