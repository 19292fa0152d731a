from nextturn.cli import main

main()
