from sideways_cli.cli import main

main()
