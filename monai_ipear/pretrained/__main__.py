from . import export_main

export_main()
