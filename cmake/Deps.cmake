# cmake/Deps.cmake — the client libraries pinned in deploy/local/libs.versions (librdkafka,
# hiredis with hiredis_ssl, libmicrohttpd): found through pkg-config with the install prefix of
# deploy/local/libs.sh searched first, each refused below its minimum.
#
# CQRS_DEPS_PREFIX is that prefix. Empty (the default): the cache's prefix,
# ${CQRS_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cqrs}/libs/prefix, when it exists; else only
# the system's pkg-config path. The prefix's lib folder becomes the RPATH of everything built
# (build tree and install): Debian 12's older librdkafka.so.1 and libmicrohttpd.so.12 have the
# same sonames, so without it the loader would quietly pick those.

set(CQRS_DEPS_PREFIX "" CACHE PATH
  "Install prefix of deploy/local/libs.sh (empty: its cache folder, when it exists)")
set(CQRS_DEPS_VERSIONS ${PROJECT_SOURCE_DIR}/deploy/local/libs.versions)
set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS ${CQRS_DEPS_VERSIONS})

if(NOT "$ENV{CQRS_CACHE_DIR}" STREQUAL "")
  set(_cqrs_cache "$ENV{CQRS_CACHE_DIR}")
elseif(NOT "$ENV{XDG_CACHE_HOME}" STREQUAL "")
  set(_cqrs_cache "$ENV{XDG_CACHE_HOME}/cqrs")
else()
  set(_cqrs_cache "$ENV{HOME}/.cache/cqrs")
endif()
set(CQRS_DEPS_DEFAULT_PREFIX "${_cqrs_cache}/libs/prefix")

if(CQRS_DEPS_PREFIX)
  if(NOT IS_DIRECTORY "${CQRS_DEPS_PREFIX}/lib")
    message(FATAL_ERROR "CQRS_DEPS_PREFIX=${CQRS_DEPS_PREFIX} holds no libraries: run "
      "deploy/local/libs.sh and pass the prefix it prints")
  endif()
  set(CQRS_DEPS_PREFIX_USED "${CQRS_DEPS_PREFIX}")
elseif(IS_DIRECTORY "${CQRS_DEPS_DEFAULT_PREFIX}/lib")
  set(CQRS_DEPS_PREFIX_USED "${CQRS_DEPS_DEFAULT_PREFIX}")
else()
  set(CQRS_DEPS_PREFIX_USED "")
endif()

if(CQRS_DEPS_PREFIX_USED)
  if("$ENV{PKG_CONFIG_PATH}" STREQUAL "")
    set(ENV{PKG_CONFIG_PATH} "${CQRS_DEPS_PREFIX_USED}/lib/pkgconfig")
  else()
    set(ENV{PKG_CONFIG_PATH} "${CQRS_DEPS_PREFIX_USED}/lib/pkgconfig:$ENV{PKG_CONFIG_PATH}")
  endif()
  # The same RPATH in the build tree and installed: the prefix's lib folder (plus any other
  # non-system folder linked from). Built with the install RPATH, since a build RPATH that
  # install rewrites gets a trailing ':', an empty entry, which the loader reads as the
  # current directory.
  list(PREPEND CMAKE_INSTALL_RPATH "${CQRS_DEPS_PREFIX_USED}/lib")
  set(CMAKE_INSTALL_RPATH_USE_LINK_PATH ON)
  set(CMAKE_BUILD_WITH_INSTALL_RPATH ON)
  message(STATUS "Client libraries: ${CQRS_DEPS_PREFIX_USED} first (deploy/local/libs.sh)")
else()
  message(STATUS "Client libraries: the system's (no ${CQRS_DEPS_DEFAULT_PREFIX})")
endif()

# The minimums, per pkg-config module: "<package> <Debian version> <modules> <minimum> <sha256>".
file(STRINGS ${CQRS_DEPS_VERSIONS} _cqrs_lines REGEX "^[a-z]")
foreach(_cqrs_line IN LISTS _cqrs_lines)
  string(REGEX REPLACE "[ \t]+" ";" _cqrs_fields "${_cqrs_line}")
  list(GET _cqrs_fields 0 _cqrs_package)
  list(GET _cqrs_fields 2 _cqrs_modules)
  list(GET _cqrs_fields 3 _cqrs_minimum)
  string(REPLACE "," ";" _cqrs_modules "${_cqrs_modules}")
  foreach(_cqrs_module IN LISTS _cqrs_modules)
    set(CQRS_DEPS_MIN_${_cqrs_module} ${_cqrs_minimum})
    set(CQRS_DEPS_PACKAGE_${_cqrs_module} ${_cqrs_package})
  endforeach()
endforeach()

# cqrs_require_pkg(<PREFIX> <module>): pkg_check_modules(<PREFIX> IMPORTED_TARGET
# "<module>>=<minimum>"), giving PkgConfig::<PREFIX>; below the minimum or missing, a
# FATAL_ERROR naming what was found and what to run.
function(cqrs_require_pkg prefix module)
  set(minimum ${CQRS_DEPS_MIN_${module}})
  if(NOT minimum)
    message(FATAL_ERROR "${module}: no minimum version in ${CQRS_DEPS_VERSIONS}")
  endif()
  # Looked up afresh on every run: pkg_check_modules keeps the library path it found
  # (pkgcfg_lib_*) in the cache, which would tie a build folder configured before the prefix
  # existed to the system's older library.
  get_property(cached DIRECTORY PROPERTY CACHE_VARIABLES)
  foreach(var IN LISTS cached)
    if(var MATCHES "^pkgcfg_lib_${prefix}_")
      unset(${var} CACHE)
    endif()
  endforeach()
  unset(__pkg_config_checked_${prefix} CACHE)
  pkg_check_modules(${prefix} QUIET IMPORTED_TARGET "${module}>=${minimum}")
  if(NOT ${prefix}_FOUND)
    execute_process(COMMAND ${PKG_CONFIG_EXECUTABLE} --modversion ${module}
      OUTPUT_VARIABLE found RESULT_VARIABLE rc OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    execute_process(COMMAND ${PKG_CONFIG_EXECUTABLE} --variable=pcfiledir ${module}
      OUTPUT_VARIABLE dir OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    if(rc EQUAL 0)
      set(what "found ${module} ${found} (${dir}/${module}.pc)")
    else()
      set(what "no ${module} found")
    endif()
    message(FATAL_ERROR "${CQRS_DEPS_PACKAGE_${module}}: ${what}, cqrs needs ${module} >= "
      "${minimum}. Run deploy/local/libs.sh: it builds the pinned versions into "
      "${CQRS_DEPS_DEFAULT_PREFIX}, which cmake then searches first (or pass "
      "-DCQRS_DEPS_PREFIX=<the prefix it prints>).")
  endif()
  message(STATUS "${module} ${${prefix}_VERSION} (>= ${minimum}) in ${${prefix}_LIBDIR}")
endfunction()
