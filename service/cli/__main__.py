"""`python -m service.cli`: the weightsmith command line."""

from service.cli.main import main

main()
