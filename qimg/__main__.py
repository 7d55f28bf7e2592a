from qimg.cli.main import main

main()
