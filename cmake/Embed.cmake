# cqrs_embed_files(<target> <symbol> <files...>)
# Compiles the given files into a static array of {name, text} so a binary carries its SQL
# migrations and needs no data files at run time (containers, packages).
function(cqrs_embed_files target symbol)
  set(out "${CMAKE_CURRENT_BINARY_DIR}/${symbol}.c")
  string(REPLACE ";" "|" files_arg "${ARGN}")
  add_custom_command(
    OUTPUT "${out}"
    COMMAND ${CMAKE_COMMAND} -DOUT=${out} -DSYMBOL=${symbol} "-DFILES=${files_arg}"
            -P "${PROJECT_SOURCE_DIR}/cmake/EmbedGen.cmake"
    DEPENDS ${ARGN} "${PROJECT_SOURCE_DIR}/cmake/EmbedGen.cmake"
    COMMENT "Embedding ${symbol}"
    VERBATIM)
  target_sources(${target} PRIVATE "${out}")
endfunction()
