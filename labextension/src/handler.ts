import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/** Where the server extension's endpoints live, below the server's base URL. */
export const API_PREFIX = 'jupyter-io';

/**
 * Call the jupyter-io server extension: `requestAPI<IOffers>('offers')`.
 *
 * Resolves with the parsed JSON body; rejects with a `ServerConnection.ResponseError` whose
 * message is the server's (it says what to do, e.g. "cannot reach the coordinator at ..."),
 * or a `ServerConnection.NetworkError` when the Jupyter server itself cannot be reached.
 */
export async function requestAPI<T>(
  endPoint = '',
  init: RequestInit = {},
  settings: ServerConnection.ISettings = ServerConnection.makeSettings()
): Promise<T> {
  const url = URLExt.join(settings.baseUrl, API_PREFIX, endPoint);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new ServerConnection.NetworkError(error as TypeError);
  }
  const text = await response.text();
  let data: any = text;
  if (text.length > 0) {
    try {
      data = JSON.parse(text);
    } catch {
      // not JSON: keep the text, the error below shows it
    }
  }
  if (!response.ok) {
    const message =
      typeof data === 'object' && data && data.message ? data.message : String(data);
    throw new ServerConnection.ResponseError(response, message);
  }
  return data as T;
}

/** The message of an error from `requestAPI`, for people. */
export function errorMessage(error: unknown): string {
  if (error instanceof Error) {
    return error.message;
  }
  return String(error);
}
