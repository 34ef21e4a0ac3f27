from lighten.cli import main

main()
