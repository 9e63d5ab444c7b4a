"""The command line: thin commands over growcli.run; no tensor maths here."""
